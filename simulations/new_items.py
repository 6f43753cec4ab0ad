"""How an item without trained ID rows is scored, compared on trained models.

    .venv/bin/python simulations/new_items.py --model runs/fed-seq+id-sched/seed-0,... \
        --json results/new-items.json

A text + ID model scores an item nobody has interacted with yet (unreleased, or added to
the catalog after training) through its text alone, plus the offset `model.new-item-bias`
(fedrec.models.seqrec). For each saved model (a federated run directory or `fedrec
train-central --save-dir`), the test metrics of the protocol with the unreleased items
scored four ways, nothing else changed:

- `offset` (the model's own rule): the text alone plus `model.new-item-bias`;
- `calibrated`: the text alone plus an offset calibrated for this model on validation:
  the one (bisection) at which the unreleased share of validation top-10 lists equals the
  share of validation targets that are unreleased;
- `text`: the text alone (offset 0);
- `mean`: the text plus the released items' mean ID vector and bias (every new item gets
  the typical trained item's ID part);

and the offset curve: the test metrics (and the validation ones the offset is chosen on)
at each offset of --offsets, the text alone underneath. An offset shifts every new item
alike, so it leaves their ranking among themselves (new-item HR@10) unchanged and decides
how many reach the full top-10 at the warm-target users' expense. Writes mean ± std over
the models per rule and per offset.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.data.evaluate import evaluate
from fedrec.data.pipeline import list_spaces
from fedrec.models.saved import load_for_dataset
from fedrec.models.train import scorer
from fedrec.results import summarize, write_result

RULES = ("offset", "calibrated", "text", "mean")
KEYS = ("full/hr@10", "full/ndcg@10", "full/cold/hr@10", "full/cold/ndcg@10",
        "full/warm/hr@10", "new-items/hr@10", "top10/unreleased-share", "sampled/hr@10",
        "sampled/cold/hr@10")
VAL_KEYS = ("full/hr@10", "full/cold/hr@10", "top10/unreleased-share")


def with_rule(model, rule: str, released: np.ndarray):
    """The model with its item_table's unknown items scored per `rule`, before any offset
    (the class's own item_table underneath, so one loaded model serves every rule)."""
    model.__dict__.pop("item_table", None)
    table = model.item_table
    known = torch.from_numpy(released)

    def item_table(E, idx=None):
        h, b = table(E, idx)
        idx = torch.arange(model.n_items) if idx is None else idx
        unknown = ~known[idx]
        h, b = h.clone(), b.clone()
        b[unknown] -= model.new_item_bias
        if rule == "mean":
            h[unknown] += model.id_emb.weight[known].mean(0)
            b[unknown] += model.id_bias.weight[known, 0].mean()
        return h, b
    model.item_table = item_table
    return model


def shifted(score, cold: np.ndarray, beta: float):
    """score with beta added to the unreleased items' scores."""
    def out(users, inputs):
        s = score(users, inputs)
        s[:, cold] += beta
        return s
    return out


def calibrate(score, split, lo: float = -2.0, hi: float = 6.0, steps: int = 12) -> float:
    """The offset at which the unreleased share of validation top-10 lists equals the share
    of validation targets that are unreleased (the share grows with the offset, so
    bisection)."""
    m = evaluate(score, split, "val")
    rate = m["cold/users"] / m["users"]
    for _ in range(steps):
        mid = (lo + hi) / 2
        share = evaluate(shifted(score, split.cold, mid), split, "val")["top10/unreleased-share"]
        lo, hi = (mid, hi) if share < rate else (lo, mid)
    return (lo + hi) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="comma-separated run directories")
    ap.add_argument("--json", default=str(ROOT / "results" / "new-items.json"))
    ap.add_argument("--offsets", default="0,0.5,1,1.5,2,2.5,3,3.5,4",
                    help="comma-separated offsets of the curve")
    args = ap.parse_args()
    offsets = [float(x) for x in args.offsets.split(",")]
    runs = []
    for run_dir in args.model.split(","):
        row = {"model": run_dir}
        cfg, model, p = load_for_dataset(run_dir)
        if not (cfg.model.kind == "seq" and cfg.model.item_text and cfg.model.id_embeddings):
            raise SystemExit(f"{run_dir}: not a text + ID model")
        E, spaces = torch.from_numpy(p.item_emb), list_spaces(cfg, p)
        for rule in RULES:
            score = scorer(with_rule(model, "mean" if rule == "mean" else "text",
                                     p.split.released), E)
            beta = {"offset": model.new_item_bias, "text": 0.0, "mean": 0.0}.get(rule)
            if beta is None:
                beta = row["calibrated-offset"] = calibrate(score, p.split)
            m = evaluate(shifted(score, p.split.cold, beta), p.split, spaces=spaces)
            row[rule] = {k: m[k] for k in KEYS}
            print(run_dir, rule, " ".join(f"{k} {m[k]:.4f}" for k in KEYS[:7]), flush=True)
        score = scorer(with_rule(model, "text", p.split.released), E)
        row["curve"] = []
        for beta in offsets:
            s = shifted(score, p.split.cold, beta)
            test, val = evaluate(s, p.split), evaluate(s, p.split, "val")
            row["curve"].append({"offset": beta, **{k: test[k] for k in KEYS},
                                 **{f"val/{k}": val[k] for k in VAL_KEYS}})
        row["seed"] = cfg.train.seed
        runs.append(row)
    summary = {rule: summarize([r[rule] for r in runs]) for rule in RULES}
    curve = [{"offset": beta, **summarize([{k: v for k, v in r["curve"][i].items()
                                            if k != "offset"} for r in runs])}
             for i, beta in enumerate(offsets)]
    write_result(args.json, {"method": "new-item rules (unreleased items scored through "
                                       "their text)", "config": cfg.to_flat(), "runs": runs,
                             "summary": summary, "curve": curve})


if __name__ == "__main__":
    main()
