"""Ranking metrics as pure functions of the positive item's rank (0 = ranked first).

Ranks are pessimistic on ties: candidates scoring exactly as high as the positive count
as ranked above it, so a constant scorer gets no credit. A candidate scored -inf is
excluded (padding, or an item the protocol removes from the ranking). NaN is treated as
the worst case for the model (a NaN positive ranks last, a NaN candidate ranks above
the positive), so a diverged model can never look good.
"""

import numpy as np


def _compare(pos: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid, below, tie) masks [U, C]; NaN on either side is neither below nor tied."""
    pos = np.asarray(pos, np.float64)[:, None]
    cand = np.asarray(cand, np.float64)
    valid = ~np.isneginf(cand)
    return valid, valid & (cand < pos), valid & (cand == pos)


def rank_of_positive(pos: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """pos [U], cand [U, C] scores of the other candidates (-inf = excluded) -> rank [U]."""
    valid, below, _ = _compare(pos, cand)
    return valid.sum(axis=1) - below.sum(axis=1)  # ties and NaN count as above


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """One relevant item: DCG = 1/log2(rank + 2) if it is in the top k, ideal DCG = 1."""
    if not len(ranks):
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / (ranks + 1.0))) if len(ranks) else float("nan")


def user_auc(pos: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """[U] P(positive scores above a random valid candidate); ties count half, NaN zero.

    A user with no valid candidate gets 0.5 (nothing to separate, no credit either way).
    """
    valid, below, tie = _compare(pos, cand)
    n = valid.sum(1)
    return np.where(n > 0, (below.sum(1) + 0.5 * tie.sum(1)) / np.maximum(n, 1), 0.5)


def auc(pos: np.ndarray, cand: np.ndarray) -> float:
    """Mean over users of `user_auc`."""
    return float(np.mean(user_auc(pos, cand))) if len(pos) else float("nan")


def summarize(prefix: str, ranks: np.ndarray, aucs: np.ndarray, k: int = 10) -> dict:
    """The metric dict from per-user ranks and AUCs (lets callers rank in chunks)."""
    return {f"{prefix}/hr@{k}": hit_rate(ranks, k), f"{prefix}/ndcg@{k}": ndcg(ranks, k),
            f"{prefix}/mrr": mrr(ranks),
            f"{prefix}/auc": float(np.mean(aucs)) if len(aucs) else float("nan")}


def ranking_metrics(prefix: str, pos: np.ndarray, cand: np.ndarray, k: int = 10) -> dict:
    return summarize(prefix, rank_of_positive(pos, cand), user_auc(pos, cand), k)
