"""How every method is judged, in one place: ranking metrics, the beyond-accuracy
statistics of top-k lists, and `evaluate` over the protocol's split (docs/protocol.md).

Ranks are pessimistic on ties: candidates scoring exactly as high as the positive count
as ranked above it, so a constant scorer gets no credit. A candidate scored -inf is
excluded (padding, or an item the protocol removes from the ranking). NaN is treated as
the worst case for the model (a NaN positive ranks last, a NaN candidate ranks above
the positive), so a diverged model can never look good.

Lists (each user's top-k of the full ranking: every item but the evaluation input's, the
held-out item included, i.e. the list a user would see):
- intra-list diversity ``div/ild@k``: 1 - mean pairwise cosine of the list's frozen PLM
  item embeddings, averaged over users (the same public vectors for every method);
- catalog coverage ``div/coverage@k``: distinct items in all users' lists / catalog size;
- novelty ``div/novelty@k``: mean -log2 p_i over the listed items, p_i = (training users
  of i + 1) / (users + 1) (the +1 keeps never-trained, cold items finite).
"""

from collections.abc import Callable

import numpy as np

from fedrec.data.protocol import Split


# -- ranking metrics: pure functions of the positive's rank (0 = ranked first) ----------
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


# -- top-k lists ------------------------------------------------------------------------
def unit_rows(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[U, k] item indices, best first (-inf = excluded; NaN ranks last)."""
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def intra_list_diversity(lists: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """[U] 1 - mean pairwise cosine within each list (NaN for lists under 2 items)."""
    v = unit[lists]                                    # [U, k, D]
    k = lists.shape[1]
    if k < 2:
        return np.full(len(lists), np.nan)
    sims = np.einsum("ukd,ujd->ukj", v, v)
    off = (sims.sum((1, 2)) - np.einsum("ukk->u", sims)) / (k * (k - 1))
    return 1.0 - off


def item_novelty(popularity: np.ndarray, n_users: int) -> np.ndarray:
    """[n_items] -log2 p_i, p_i = (training users of i + 1) / (n_users + 1)."""
    return -np.log2((np.asarray(popularity, np.float64) + 1.0) / (n_users + 1.0))


class ListStats:
    """Accumulates the beyond-accuracy metrics of top-k lists chunk by chunk."""

    def __init__(self, n_items: int, novelty: np.ndarray, unit: np.ndarray | None, k: int):
        self.k, self.novelty, self.unit = k, novelty, unit
        self.seen = np.zeros(n_items, bool)
        self.ild: list[np.ndarray] = []
        self.nov: list[np.ndarray] = []

    def add(self, lists: np.ndarray) -> None:
        self.seen[lists.ravel()] = True
        self.nov.append(self.novelty[lists].mean(1))
        if self.unit is not None:
            self.ild.append(intra_list_diversity(lists, self.unit))

    def summary(self) -> dict[str, float]:
        """NaN when no list was added (no evaluation users)."""
        def mean(parts: list[np.ndarray]) -> float:
            values = np.concatenate(parts) if parts else np.zeros(0)
            return float(np.nanmean(values)) if len(values) else float("nan")
        k = self.k
        out = {f"div/coverage@{k}": float(self.seen.mean()) if self.nov else float("nan"),
               f"div/novelty@{k}": mean(self.nov)}
        if self.unit is not None:
            out[f"div/ild@{k}"] = mean(self.ild)
        return out


# users [B], their evaluation inputs (item arrays, time order) -> scores [B, n_items]
Scorer = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]


def scored_chunks(score: Scorer, split: Split, stage: str, chunk: int):
    """Per chunk of `stage`'s evaluation users: (users, scores, full-ranking candidates).
    scores [B, n_items] are the scorer's (float64, shape checked); the candidates are a
    copy with each evaluation input's items at -inf (never candidates)."""
    users = split.eval_users(stage)
    for start in range(0, len(users), chunk):
        ub = users[start:start + chunk]
        inputs = [split.eval_history(u, stage) for u in ub]
        s = np.asarray(score(ub, inputs), dtype=np.float64)
        if s.shape != (len(ub), split.n_items):
            raise ValueError(f"scorer returned shape {s.shape}, expected "
                             f"{(len(ub), split.n_items)} (users x items)")
        full = s.copy()  # np.asarray may alias the scorer's own array: never write to it
        for r, seen in enumerate(inputs):
            full[r, seen] = -np.inf
        yield ub, s, full


def evaluate(score: Scorer, split: Split, stage: str = "test", k: int = 10,
             chunk: int = 512, item_vectors: np.ndarray | None = None) -> dict[str, float]:
    """Sampled, full and cold-start ranking metrics with the protocol's keys, and the
    diversity of each user's top-k (fedrec.ranking.diversity: coverage, novelty, and intra-list
    diversity when `item_vectors`, the frozen PLM item embeddings, are given).

    The scorer gets each user's evaluation input (Split.eval_history): the training
    history at "val", plus the validation item at "test".
    Users are scored `chunk` at a time and only per-user ranks are kept, so memory stays
    at one [chunk, n_items] block however many users there are. With no eval users every
    metric is NaN (the keys are still present).
    """
    users = split.eval_users(stage)
    target = split.target(stage)
    negatives = split.test_negatives if stage == "test" else split.val_negatives
    ranks: dict[str, list] = {"sampled": [], "full": []}
    aucs: dict[str, list] = {"sampled": [], "full": []}
    if item_vectors is not None and not np.shape(item_vectors)[1]:
        item_vectors = None  # no text vectors: no ILD (callers pass pipeline.catalog_vectors)
    lists = ListStats(split.n_items, item_novelty(split.item_popularity(), split.n_users),
                      None if item_vectors is None else unit_rows(item_vectors), k)
    for ub, s, full in scored_chunks(score, split, stage, chunk):
        rows = np.arange(len(ub))
        pos = s[rows, target[ub]]
        neg = negatives[ub]
        samp = np.where(neg >= 0, s[rows[:, None], np.maximum(neg, 0)], -np.inf)
        lists.add(top_k(full, k))                # the list the user sees (positive included)
        full[rows, target[ub]] = -np.inf         # the positive is scored separately
        for name, cand in (("sampled", samp), ("full", full)):
            ranks[name].append(rank_of_positive(pos, cand))
            aucs[name].append(user_auc(pos, cand))
    cat = {n: (np.concatenate(r) if r else np.zeros(0, np.int64)) for n, r in ranks.items()}
    cat_auc = {n: (np.concatenate(a) if a else np.zeros(0)) for n, a in aucs.items()}
    out = {**summarize("sampled", cat["sampled"], cat_auc["sampled"], k),
           **summarize("full", cat["full"], cat_auc["full"], k)}
    cold = split.cold[target[users]]
    for name, mask in (("cold", cold), ("warm", ~cold)):  # on the sampled candidates
        m = summarize(name, cat["sampled"][mask], cat_auc["sampled"][mask], k)
        out[f"{name}/hr@{k}"], out[f"{name}/ndcg@{k}"] = m[f"{name}/hr@{k}"], m[f"{name}/ndcg@{k}"]
        out[f"{name}/users"] = int(mask.sum())
    out["users"] = len(users)
    return {**out, **lists.summary()}
