"""Privacy-budget sweep (fedrec/experiments/sweep.py, `fedrec privacy-sweep`)."""

import json
import math

import numpy as np
import pytest

from fedrec.errors import FedrecError
from fedrec.experiments.sweep import cells, plan, user_sigma
from fedrec.federation.simulate import write_overrides
from fedrec.privacy.accounting import parse_epsilons, user_epsilon

pytestmark = pytest.mark.usefixtures("isolated")


def test_epsilon_grid_parses_inf_and_rejects_nonpositive():
    assert parse_epsilons("inf, 8,4,2,1") == [math.inf, 8, 4, 2, 1]
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(FedrecError, match="--epsilons"):
            parse_epsilons(bad)


def test_cells_run_the_non_private_baseline_once():
    assert cells(["block", "user"], [math.inf, 8, 1]) == [
        ("none", math.inf), ("block", 8), ("block", 1), ("user", 8), ("user", 1)]
    assert cells(["user"], [2]) == [("user", 2)]


@pytest.mark.parametrize("eps", [8.0, 1.0])
def test_user_level_sigma_spends_the_target_within_2_percent(cfg, eps):
    c = cfg.override(**{"fed.num-rounds": 50, "fed.clients-per-round": 10})
    planned = plan(c, "user", eps, population=100)
    assert planned.privacy.mode == "user" and planned.privacy.target_epsilon == eps
    assert planned.privacy.noise_multiplier == pytest.approx(user_sigma(c, eps, 100))
    spent = user_epsilon(planned, 50, 10 / 100)
    assert 0.98 * eps <= spent <= eps * 1.0001  # and the budget check lets all 50 rounds run


def test_block_cell_solves_on_the_device_and_inf_turns_dp_off(cfg):
    p = plan(cfg, "block", 4.0, population=100)
    assert (p.privacy.mode, p.privacy.target_epsilon) == ("sample", 4.0)
    assert plan(p, "user", math.inf, 100).privacy.mode == "none"


def test_cli_writes_a_table_json_and_plot_naming_the_unit(cfg, run_cli, tmp_path):
    flat = cfg.override(**{"fed.num-rounds": 2, "fed.clients-per-round": 4,
                           "fed.eval-every": 1}).to_flat()
    toml = write_overrides(tmp_path / "tiny.toml", flat)
    out_json, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, out, err = run_cli("privacy-sweep", "--config", str(toml), "--epsilons", "inf,8",
                             "--seeds", "0,1", "--runs-dir", str(tmp_path / "runs"),
                             "--json", str(out_json), "--plot", str(png))
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["unit"], r["epsilon"]) for r in rows] == [
        ("none", math.inf), ("block", 8), ("user", 8)]
    for r in rows:
        assert r["seeds"] == [0, 1] and r["rounds"] == 2 and r["population"] > 0
        assert 0 <= r["sampled/hr@10"]["mean"] <= 1 and 0 <= r["full/hr@10"]["mean"] <= 1
        per_seed = r["per-seed"]["full/hr@10"]
        assert len(per_seed) == 2 and np.mean(per_seed) == pytest.approx(r["full/hr@10"]["mean"])
    assert [r["unit-detail"] for r in rows] == [
        "none", "block of up to 9 consecutive interactions", "user"]
    assert rows[1]["sigma"] > 0
    assert 0 < rows[1]["epsilon-spent-max"] and 0 < rows[2]["epsilon-spent-max"] <= 8
    assert rows[2]["delta"] == cfg.privacy.delta and rows[2]["accountant"] == "rdp"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "block" in out and "user" in out


def test_cli_rejects_a_bad_grid_in_one_line(run_cli):
    code, _, err = run_cli("privacy-sweep", "--epsilons", "8,0")
    assert code == 2 and err.strip().count("\n") == 0 and "--epsilons" in err
    code, _, err = run_cli("privacy-sweep", "--units", "item")
    assert code == 2 and "--units" in err


def test_per_unit_overrides_and_finished_cells_are_reused(cfg, run_cli, tmp_path):
    """--user-run-config reaches the user cells only; a second sweep over the same runs
    directory reuses every finished cell (same config) and runs only what is new."""
    flat = cfg.override(**{"fed.num-rounds": 2, "fed.clients-per-round": 4,
                           "fed.eval-every": 1}).to_flat()
    toml = write_overrides(tmp_path / "tiny.toml", flat)
    runs, out_json = tmp_path / "runs", tmp_path / "sweep.json"
    args = ["privacy-sweep", "--config", str(toml), "--seeds", "0", "--runs-dir", str(runs),
            "--user-run-config", "privacy.max-grad-norm=0.25", "--json", str(out_json)]
    code, out, err = run_cli(*args, "--epsilons", "inf,8", "--units", "user")
    assert code == 0, err
    first = json.loads((runs / "user-eps8" / "seed-0" / "results.json").read_text())
    assert first["config"]["privacy.max-grad-norm"] == 0.25
    code, out, err = run_cli(*args, "--epsilons", "inf,8", "--units", "block,user",
                             "--block-run-config", "privacy.max-grad-norm=2.0")
    assert code == 0, err
    assert out.count("reused") == 2  # the ε = ∞ and the user cell
    rows = {r["unit"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["user"]["max-grad-norm"] == 0.25 and rows["block"]["max-grad-norm"] == 2.0
    again = json.loads((runs / "user-eps8" / "seed-0" / "results.json").read_text())
    assert again["seconds"] == first["seconds"]  # not run again
    code, out, err = run_cli(*args, "--epsilons", "8", "--units", "user",
                             "--user-run-config", "privacy.max-grad-norm=0.5")
    assert code == 0 and "reused" not in out  # another config: run, not reused
