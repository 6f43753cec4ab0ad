"""Ranking metrics as pure functions of the positive item's rank (0 = ranked first).

Ranks are pessimistic on ties: candidates scoring exactly as high as the positive count
as ranked above it, so a constant scorer gets no credit.
"""

import numpy as np


def rank_of_positive(pos: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """pos [U], cand [U, C] scores of the other candidates (-inf = excluded) -> rank [U]."""
    return (cand >= pos[:, None]).sum(axis=1)


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


def auc(pos: np.ndarray, cand: np.ndarray) -> float:
    """Mean over users of P(positive scores above a random candidate); ties count half."""
    if not len(pos):
        return float("nan")
    valid = np.isfinite(cand)
    above = ((cand < pos[:, None]) & valid).sum(1) + 0.5 * ((cand == pos[:, None]) & valid).sum(1)
    return float(np.mean(above / np.maximum(valid.sum(1), 1)))


def ranking_metrics(prefix: str, pos: np.ndarray, cand: np.ndarray, k: int = 10) -> dict:
    ranks = rank_of_positive(pos, cand)
    return {f"{prefix}/hr@{k}": hit_rate(ranks, k), f"{prefix}/ndcg@{k}": ndcg(ranks, k),
            f"{prefix}/mrr": mrr(ranks), f"{prefix}/auc": auc(pos, cand)}
