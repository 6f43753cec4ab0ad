"""How an item without trained ID rows is scored, compared on trained models.

    .venv/bin/python simulations/new_items.py --model runs/fed-seq+id/seed-0,... \
        --json results/new-items.json

For each saved text + ID model (a federated run directory or `fedrec train-central
--save-dir`), the test metrics of the protocol with the unreleased items' ID part taken
four ways, nothing else changed:

- `map+offset` (the model's own rule): the ID vector and bias predicted from the item's
  text by the map trained with item-ID dropout (fedrec.models.seqrec), plus the
  calibrated offset `model.new-item-bias`;
- `map+calibrated`: the map plus an offset calibrated for this model on validation: the
  one (bisection) at which the unreleased share of validation top-10 lists equals the
  share of validation targets that are unreleased;
- `map`: the map alone (offset 0);
- `zero+calibrated`: no ID part (the text alone), with an offset calibrated the same way;
- `zero`: no ID part (the rows' zero initialisation, the rule before the map existed):
  an unreleased item competes with the trained items on its text part alone;
- `mean`: the mean ID vector and bias of the released items (a calibrated constant:
  every new item gets the typical trained item's ID part).

Writes mean ± std over the models per rule.
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

RULES = ("map+offset", "map+calibrated", "map", "zero+calibrated", "zero", "mean")
BASE = {"map+calibrated": "map+offset", "zero+calibrated": "zero"}  # calibrated on top of
KEYS = ("full/hr@10", "full/ndcg@10", "full/cold/hr@10", "full/cold/ndcg@10",
        "full/warm/hr@10", "new-items/hr@10", "top10/unreleased-share", "sampled/hr@10",
        "sampled/cold/hr@10")


def with_rule(model, rule: str, released: np.ndarray):
    """The model with its item_table's unknown items' ID part replaced per `rule` (the
    class's own item_table underneath, so one loaded model serves every rule)."""
    model.__dict__.pop("item_table", None)
    if rule == "map+offset":
        return model
    table = model.item_table
    known = torch.from_numpy(released)

    def item_table(E, idx=None):
        h, b = table(E, idx)
        idx = torch.arange(model.n_items) if idx is None else idx
        unknown = ~known[idx]
        g = model.id_from_text(E)[unknown]  # what the model added for them
        h, b = h.clone(), b.clone()
        b[unknown] -= model.new_item_bias
        if rule == "map":
            return h, b
        h[unknown] -= g[:, :-1]
        b[unknown] -= g[:, -1]
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


def calibrate(score, split, lo: float = -3.0, hi: float = 3.0, steps: int = 10) -> float:
    """The offset (added to the model's own) at which the unreleased share of validation
    top-10 lists equals the share of validation targets that are unreleased (the share
    grows with the offset, so bisection)."""
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
    args = ap.parse_args()
    runs = []
    for run_dir in args.model.split(","):
        row = {"model": run_dir}
        cfg, model, p = load_for_dataset(run_dir)
        if getattr(model, "id_from_text", None) is None:
            raise SystemExit(f"{run_dir}: not a text + ID model")
        E, spaces = torch.from_numpy(p.item_emb), list_spaces(cfg, p)
        for rule in RULES:
            score = scorer(with_rule(model, BASE.get(rule, rule), p.split.released), E)
            if rule in BASE:  # the offset in place of the model's own
                own = model.new_item_bias if BASE[rule] == "map+offset" else 0.0
                extra = calibrate(score, p.split)
                row[f"{rule}-offset"] = own + extra
                score = shifted(score, p.split.cold, extra)
            m = evaluate(score, p.split, spaces=spaces)
            row[rule] = {k: m[k] for k in KEYS}
            print(run_dir, rule, " ".join(f"{k} {m[k]:.4f}" for k in KEYS[:6]))
        row["seed"] = cfg.train.seed
        runs.append(row)
    summary = {rule: summarize([r[rule] for r in runs]) for rule in RULES}
    write_result(args.json, {"method": "new-item rules (ID part of unreleased items)",
                             "config": cfg.to_flat(), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
