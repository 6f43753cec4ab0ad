"""Reasons for recommendations, and a test of whether they are faithful.

A reason for recommending item i is a history item j whose removal lowers i's score
most: leave-one-out on the input sequence (the model re-reads the input without j,
older items shifting into its window). It is exact for this model, costs one batched
forward pass of len(input) rows, and so runs on the device (simulations/bench_device.py).
Up to MAX_REASONS items with a positive drop are named (the single largest otherwise).

Faithfulness (`deletion_test`, command `fedrec explain-eval`): delete the named reasons
from the input and measure how far the recommended item falls in the full ranking,
against deleting as many random items of the input window; reasons are faithful for a
(user, item) pair when their deletion drops it further than random deletions do on
average. Specificity: the number of distinct reason sets among a user's top-k. For a
model with graph features the knowledge reasons (fedrec.ranking.facts) get the same test.
"""

from pathlib import Path

import numpy as np
import torch

from fedrec.data.datasets import item_terms
from fedrec.data.features import load_graph
from fedrec.models.protocol import Recommender, batch_inputs
from fedrec.models.saved import load_for_dataset
from fedrec.ranking.facts import fact_deletion_test, fact_index, graph_columns
from fedrec.results import summarize

MAX_REASONS = 3


def window_positions(seq: np.ndarray, max_len: int) -> np.ndarray:
    """Positions in seq of the items the model reads (its last max_len)."""
    return np.arange(max(0, len(seq) - max_len), len(seq))


def scores(model: Recommender, h: torch.Tensor, b: torch.Tensor, inputs: list[np.ndarray]
           ) -> torch.Tensor:
    """[len(inputs), N] scores of every item for each input, given the model's item table
    h, b (item_table): for callers scoring many inputs against one table."""
    return model.states(h, batch_inputs(inputs, model.max_len), None)[:, -1] @ h.T + b


@torch.no_grad()
def loo_drops(model: Recommender, h: torch.Tensor, b: torch.Tensor, seq: np.ndarray,
              items: torch.Tensor) -> torch.Tensor:
    """[len(window), len(items)]: how much each window item's removal lowers each item's
    score. h, b: the model's item table (item_table)."""
    rows = [seq] + [np.delete(seq, p) for p in window_positions(seq, model.max_len)]
    s = scores(model, h, b, rows)[:, items]
    return s[:1] - s[1:]


def pick_reasons(drop: torch.Tensor) -> list[list[int]]:
    """Per column of drop [W, k]: window indices of the up-to-MAX_REASONS largest
    positive drops, largest first (the largest one if none is positive)."""
    out = []
    for r in range(drop.shape[1]):
        order = torch.argsort(drop[:, r], descending=True)[:MAX_REASONS].tolist()
        out.append([j for j in order if drop[j, r] > 0] or order[:1])
    return out


def shared_terms(item: dict[str, str], reasons: list[dict[str, str]]) -> list[str]:
    """The text-level reason: the terms of list-like catalog fields that the item shares
    with its reasons, in the item's order."""
    theirs = {ft for r in reasons for ft in item_terms(r)}
    terms = []
    for field, t in item_terms(item):
        if (field, t) in theirs and t not in terms:
            terms.append(t)
    return terms


@torch.no_grad()
def deletion_test(model: Recommender, E: torch.Tensor, histories: list[np.ndarray], k: int = 10,
                  n_random: int = 10, seed: int = 0, cases: list | None = None) -> dict:
    """Faithfulness of the leave-one-out reasons over users' evaluation inputs.

    For each user's top-k (every item but the input's is a candidate) and each listed
    item: its rank after deleting its reasons from the input vs after deleting as many
    random window items (n_random draws). Returns the per-pair arrays and a summary;
    `cases` (a list) receives each (input, listed item, its reason items)."""
    model.eval()
    rng = np.random.default_rng(seed)
    h, b = model.item_table(E)
    L = model.max_len
    drops_r, drops_rand, wins, n_sets, sizes = [], [], [], [], []
    for seq in histories:
        seq = np.asarray(seq, np.int64)
        window = window_positions(seq, L)
        if len(window) < 2 * MAX_REASONS:
            continue
        base = scores(model, h, b, [seq])[0]
        base[torch.from_numpy(seq)] = -torch.inf
        top = torch.topk(base, k).indices
        reasons = pick_reasons(loo_drops(model, h, b, seq, top))
        if cases is not None:
            cases += [(seq, i, [int(seq[window[j]]) for j in r])
                      for i, r in zip(top.tolist(), reasons)]
        n_sets.append(len({frozenset(r) for r in reasons}))
        rows = []
        for r in reasons:
            sizes.append(len(r))
            rows.append(np.delete(seq, window[r]))
            rows += [np.delete(seq, rng.choice(window, len(r), replace=False))
                     for _ in range(n_random)]
        s = scores(model, h, b, rows)   # [k * (1 + R), N]
        s[:, torch.from_numpy(seq)] = -torch.inf  # candidates: the original input's complement
        target = top.repeat_interleave(1 + n_random)
        after = (s > s[torch.arange(len(s)), target][:, None]).sum(1).view(k, 1 + n_random)
        before = (base[None] > base[top][:, None]).sum(1)
        fall = (after - before[:, None]).double().numpy()
        drops_r.append(fall[:, 0])
        drops_rand.append(fall[:, 1:])
        wins.append(((fall[:, :1] > fall[:, 1:]) + 0.5 * (fall[:, :1] == fall[:, 1:])).mean(1))
    if not drops_r:
        return {"summary": {"users": 0}}
    dr, dx = np.concatenate(drops_r), np.concatenate(drops_rand)
    summary = {
        "users": len(n_sets), "pairs": len(dr), "k": k, "random-draws": n_random,
        "share-reasons-beat-random": float(np.mean(dr > dx.mean(1))),
        "win-rate-per-draw": float(np.mean(np.concatenate(wins))),
        "rank-drop-reasons-mean": float(dr.mean()), "rank-drop-reasons-median": float(np.median(dr)),
        "rank-drop-random-mean": float(dx.mean()), "rank-drop-random-median": float(np.median(dx)),
        "distinct-reason-sets-median": float(np.median(n_sets)),
        "distinct-reason-sets-mean": float(np.mean(n_sets)),
        "reasons-per-item-mean": float(np.mean(sizes)),
    }
    return {"summary": summary, "distinct-reason-sets": n_sets}


def evaluate_runs(run_dirs: list[str], users: int = 0, n_random: int = 10) -> dict:
    """`fedrec explain-eval`: the deletion test on the first `users` test users (0 = all)
    of each run (seeds): a result file's body."""
    torch.set_num_threads(1)
    runs = []
    for run_dir in run_dirs:
        cfg, net, p = load_for_dataset(run_dir)
        ids = p.split.eval_users("test")[:users or None]
        E, cases, cols = torch.from_numpy(p.item_emb), [], graph_columns(net)
        res = deletion_test(net, E, [p.split.eval_history(u, "test") for u in ids],
                            n_random=n_random, seed=cfg.train.seed, cases=cases)
        if cols is not None:  # the graph reasons: shared facts, deleted from the item
            ids_ = p.dataset.item_ids
            index = fact_index(load_graph(cfg, ids_, Path(p.dataset.source).parent), ids_)
            graph = fact_deletion_test(net, E, index, cols, cases, n_random, cfg.train.seed)
            res["summary"].update({f"graph/{k}": v for k, v in graph.items()})
        runs.append({"model": run_dir, "seed": cfg.train.seed, **res})
    return {"method": "explain-eval (leave-one-out reasons)", "config": cfg.to_flat(),
            "runs": runs, "summary": summarize([r["summary"] for r in runs])}
