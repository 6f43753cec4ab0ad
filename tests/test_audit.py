"""Membership-inference audit (fedrec/experiments/audit.py, `fedrec audit`) on the tiny data."""

import itertools
import json

import numpy as np
import pytest

from fedrec.data.pipeline import prepare
from fedrec.experiments.audit import STATS, audit, global_params, roc_auc, targets
from fedrec.federation.simulate import write_overrides
from tiny import TINY, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.mark.parametrize("members, nonmembers, want", [
    ([3, 4], [1, 2], 1.0),
    ([1, 2], [3, 4], 0.0),
    ([5, 5], [5, 5, 5], 0.5),          # all tied
    ([1, 3], [2, 2], 0.5),             # (1<2, 1<2, 3>2, 3>2) -> 2 of 4
    ([2], [2, 1], 0.75),               # a tie counts 1/2: (0.5 + 1) / 2
    ([0.1, 0.4, 0.35, 0.8], [0.3, 0.2, 0.35, 0.9], 8.5 / 16),
])
def test_auc_by_hand(members, nonmembers, want):
    assert roc_auc(members, nonmembers) == pytest.approx(want)


def test_auc_equals_counting_pairs_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 5, rng.integers(1, 9)), rng.integers(0, 5, rng.integers(1, 9))
        pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
        assert roc_auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert np.isnan(roc_auc([], [1.0]))


def test_targets_are_training_items_against_as_many_outside(cfg, prepared):
    split = prepared.split
    chosen = targets(split, 5, seed=0)
    again = targets(split, 5, seed=0)
    assert len(chosen) == 5 and all(a[0] == b[0] and (a[2] == b[2]).all()
                                    for a, b in zip(chosen, again))
    for u, members, non in chosen:
        assert set(members) == set(split.history(u))
        assert len(non) == len(members) and not set(non) & set(members)


def _audit(tiny_root, overrides, users=12):
    cfg = tiny_config(tiny_root, overrides)
    p = prepare(cfg)
    arrays = global_params(cfg, p.item_emb.shape[1], p.split.n_items)
    return audit(cfg, p.item_emb, p.split, arrays, targets(p.split, users, 0), log=lambda *_: None)


@pytest.mark.parametrize("model", [{}, {"model.kind": "fedmf"}], ids=["seq", "fedmf"])
def test_attack_finds_members_in_a_leaky_setting_and_dp_hides_them(tiny_root, model):
    leaky = _audit(tiny_root, {**model, "train.local-epochs": 20})  # no DP
    assert set(leaky["auc"]) == set(STATS)
    assert leaky["best"]["auc"] > 0.75 and leaky["epsilon_spent"]["max"] == float("inf")
    private = _audit(tiny_root, {**model, "train.local-epochs": 20,
                                 "privacy.mode": "sample", "privacy.target-epsilon": 1.0})
    assert 0 < private["epsilon_spent"]["max"] <= 1.0 and private["noise_multiplier_mean"] > 1
    assert private["best"]["auc"] < leaky["best"]["auc"] - 0.15


def test_cli_writes_rows_per_epsilon(tiny_root, tmp_path, run_cli):
    cfg = tiny_config(tiny_root)
    conf = write_overrides(tmp_path / "tiny.toml", {**TINY, **{
        k: v for k, v in cfg.to_flat().items() if k.startswith(("data.", "encoder."))}})
    out = tmp_path / "audit.json"
    code, text, err = run_cli("audit", "--config", str(conf), "--users", "4",
                              "--epsilons", "inf,8", "--json", str(out))
    assert code == 0, err
    assert "membership inference" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["epsilon"] for r in rows] == [None, 8.0]
    assert [r["privacy"]["unit"] for r in rows] == [
        "none", "block of up to 9 consecutive interactions"]
    assert rows[0]["epsilon_spent"] is None and 0 < rows[1]["epsilon_spent"]["max"] <= 8
    assert all(r["users"] == 4 and r["members"] == r["nonmembers"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--epsilons", "inf,abc"], "--epsilons: 'abc' is not a number or inf"),
    (["--epsilons", "0"], "--epsilons: each ε must be > 0 or inf"),
    (["--epsilons", ","], "--epsilons: give at least one value"),
    (["--users", "0"], "--users must be >= 1"),
    (["--model", "/nonexistent/run"], "is not a run directory"),
])
def test_cli_bad_input_is_one_line_exit_2(run_cli, args, message):
    code, _, err = run_cli("audit", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_audits_a_saved_model_and_refuses_one_that_does_not_fit(tiny_root, tmp_path,
                                                                      run_cli):
    from safetensors.numpy import save_file

    import tiny

    cfg = tiny_config(tiny_root)
    run = tiny.write_run(tmp_path, cfg, scale=0.05, seed=0)
    out = tmp_path / "audit.json"
    code, _, err = run_cli("audit", "--model", str(run), "--users", "3", "--epsilons", "inf",
                           "--json", str(out))
    assert code == 0, err
    assert json.loads(out.read_text())["params"] == str(run)
    save_file({"item_bias.weight": np.zeros((1, 3), np.float32)}, str(run / "final.safetensors"))
    code, _, err = run_cli("audit", "--model", str(run))
    assert code == 2 and "does not fit its own config" in err
    assert len(err.strip().splitlines()) == 1
    (run / "final.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli("audit", "--model", str(run))
    assert code == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1
