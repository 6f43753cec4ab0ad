"""The committed headline results are still what the current code computes.

Reruns, in this process on the real ml-100k and the real MiniLM (seed 0), the first
epochs of the headline centralized run and the first rounds of the headline federated
run, and compares them with the curves stored in their result files. A change that
moves them must regenerate those files in the same change (README, "Results").

Tolerances: a loss within 0.5% and a ranking metric within 0.01 (≈ 9 of 943 users):
runs on this machine's kind repeat to the last digit, but the committed federated run
came from Flower's Simulation Engine, whose replies are averaged in arrival order.
"""

import json
from pathlib import Path

import pytest
import torch

from fedrec.config import Config, stored_config
from fedrec.data.fetch import fetch_ml100k
from fedrec.data.pipeline import prepare
from fedrec.models.central import train_central

ROOT = Path(__file__).resolve().parents[1]
CENTRAL, FEDERATED = ROOT / "results" / "central-seq+id.json", ROOT / "results" / "fed-seq+id-sched.json"
EPOCHS, LOSS_RTOL, METRIC_ATOL = 2, 5e-3, 0.01
pytestmark = pytest.mark.slow


def stored(path: Path, epochs_or_rounds: dict) -> tuple[Config, list[dict]]:
    res = json.loads(path.read_text())
    run = next(r for r in res["runs"] if r["seed"] == 0)
    cfg = Config.from_flat(stored_config(res["config"])).override(
        **{"train.seed": 0, "data.cache-dir": "", **epochs_or_rounds})
    fetch_ml100k(cfg.data.cache_dir)
    return cfg, run["curve"]


def close(got: dict, want: dict, keys: list[str]) -> None:
    for k in keys:
        tol = LOSS_RTOL * abs(want[k]) if "loss" in k else METRIC_ATOL
        assert got[k] == pytest.approx(want[k], abs=tol), (k, got, want)


def test_centralized_headline_first_epochs_match_its_result_file():
    cfg, want = stored(CENTRAL, {"central.epochs": EPOCHS})
    torch.set_num_threads(1)
    p = prepare(cfg)
    got = train_central(cfg, p.split, p.item_emb, log=lambda *_: None)["curve"]
    assert len(got) == EPOCHS
    for g, w in zip(got, want[:EPOCHS]):
        close(g, w, ["loss", "val/sampled/hr@10", "val/full/hr@10", "val/full/ndcg@10"])


def test_federated_headline_first_rounds_match_its_result_file(tmp_path):
    """The first evaluated rounds of the stored run, under its own config (its planned
    rounds included: the server lr schedule depends on them), stopped after them."""
    import clients.app
    from fedrec.experiments.runs import round_curve
    from tiny import Dying, Killed, run_inprocess

    res = json.loads(FEDERATED.read_text())
    first_eval = int(res["config"]["fed.eval-every"])
    cfg, want = stored(FEDERATED, {"fed.run-dir": str(tmp_path / "run")})
    torch.set_num_threads(1)
    grid = Dying(clients.app.app, cfg.to_flat(), prepare(cfg).split.n_users,
                 at=("train", first_eval + 1), after=0)
    with pytest.raises(Killed):
        run_inprocess(cfg, grid)
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    got = {r["round"]: r for r in round_curve(out["rounds"])}
    want = {r["round"]: r for r in want}
    for rnd in range(1, first_eval + 1):
        close(got[rnd], want[rnd], ["train-loss"])
    keys = ["server/full/hr@10", "server/sampled/hr@10", "federated/val/full/hr@10"]
    close(got[0], want[0], keys[:2])
    close(got[first_eval], want[first_eval], keys)
