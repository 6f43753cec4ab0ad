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
from dataclasses import dataclass

import numpy as np

from fedrec.data.protocol import Split


# -- ranking metrics: pure functions of the positive's rank (0 = ranked first) ----------
def roc_auc(members, nonmembers) -> float:
    """P(score of a random member > that of a random non-member), ties counting 1/2:
    the Mann-Whitney U statistic from average ranks. NaN if either side is empty."""
    pos, neg = np.asarray(members, float), np.asarray(nonmembers, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True,
                                   return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]  # 1-based average rank of each tie
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


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


@dataclass(frozen=True)
class Space:
    """Item features that list diversity and a re-ranker's similarity are measured in:
    unit rows compared by cosine, or 0/1 sets (genres) compared by Jaccard."""

    features: np.ndarray  # float32 [n_items, D]
    jaccard: bool = False

    @classmethod
    def vectors(cls, vectors: np.ndarray, centred: bool = False) -> "Space":
        """PLM vectors; centred: minus the catalog's mean first (raw MiniLM cosines are
        anisotropic: a random list's are far from 0)."""
        v = np.asarray(vectors, np.float64)
        return cls(unit_rows(v - v.mean(0) if centred else v).astype(np.float32))

    @classmethod
    def sets(cls, item_sets: list[set]) -> "Space":
        terms = sorted({t for s in item_sets for t in s})
        at = {t: j for j, t in enumerate(terms)}
        out = np.zeros((len(item_sets), max(len(terms), 1)), np.float32)
        for i, s in enumerate(item_sets):
            out[i, [at[t] for t in s]] = 1.0
        return cls(out, jaccard=True)

    def sim(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Similarity of features a [U, P, D] with b [U, D] -> [U, P]."""
        dot = np.einsum("upd,ud->up", a, b)
        if not self.jaccard:
            return dot
        union = a.sum(-1) + b.sum(-1)[:, None] - dot
        return np.where(union > 0, dot / np.maximum(union, 1e-12), 0.0)

    def ild(self, lists: np.ndarray) -> np.ndarray:
        """[U] 1 - mean pairwise similarity within each list (NaN for lists under 2)."""
        k = lists.shape[1]
        if k < 2:
            return np.full(len(lists), np.nan)
        f = self.features[lists]                                    # [U, k, D]
        sims = np.stack([self.sim(f, f[:, j]) for j in range(k)], 2)  # [U, k, k]
        return 1.0 - (sims.sum((1, 2)) - np.einsum("ukk->u", sims)) / (k * (k - 1))


def item_novelty(popularity: np.ndarray, n_users: int) -> np.ndarray:
    """[n_items] -log2 p_i, p_i = (training users of i + 1) / (n_users + 1)."""
    return -np.log2((np.asarray(popularity, np.float64) + 1.0) / (n_users + 1.0))


ILD_KEYS = {"plm": "div/ild@{k}", "plm-centred": "div/ild-centred@{k}",
            "genres": "div/genre-ild@{k}"}


class ListStats:
    """Accumulates the beyond-accuracy metrics of top-k lists chunk by chunk: coverage,
    novelty, and intra-list diversity in each given Space (ILD_KEYS)."""

    def __init__(self, n_items: int, novelty: np.ndarray, spaces: dict[str, Space] | None,
                 k: int):
        self.k, self.novelty, self.spaces = k, novelty, spaces or {}
        self.seen = np.zeros(n_items, bool)
        self.ild: dict[str, list[np.ndarray]] = {name: [] for name in self.spaces}
        self.nov: list[np.ndarray] = []

    def add(self, lists: np.ndarray) -> None:
        self.seen[lists.ravel()] = True
        self.nov.append(self.novelty[lists].mean(1))
        for name, space in self.spaces.items():
            self.ild[name].append(space.ild(lists))

    def summary(self) -> dict[str, float]:
        """NaN when no list was added (no evaluation users)."""
        def mean(parts: list[np.ndarray]) -> float:
            values = np.concatenate(parts) if parts else np.zeros(0)
            return float(np.nanmean(values)) if len(values) else float("nan")
        k = self.k
        out = {f"div/coverage@{k}": float(self.seen.mean()) if self.nov else float("nan"),
               f"div/novelty@{k}": mean(self.nov)}
        for name, parts in self.ild.items():
            out[ILD_KEYS[name].format(k=k)] = mean(parts)
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


def candidates(s: np.ndarray, full: np.ndarray, target: np.ndarray, negatives: np.ndarray,
               cold: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A chunk of users' positive scores [U] and their candidates [U, *] per ranking: the
    stored sampled negatives; the full ranking (`full`: every item but the input's, -inf
    elsewhere; the positive is taken out here, in place); the unreleased items only
    ("new-items", for users whose target is one)."""
    rows = np.arange(len(target))
    pos = s[rows, target]
    samp = np.where(negatives >= 0, s[rows[:, None], np.maximum(negatives, 0)], -np.inf)
    full[rows, target] = -np.inf
    return pos, {"sampled": samp, "full": full, "new-items": np.where(cold, full, -np.inf)}


def evaluate(score: Scorer, split: Split, stage: str = "test", k: int = 10,
             chunk: int = 512, spaces: dict[str, Space] | None = None) -> dict[str, float]:
    """Ranking metrics with the protocol's keys (docs/protocol.md), and the diversity of
    each user's top-k (coverage, novelty, and intra-list diversity in each of `spaces`:
    fedrec.data.pipeline.list_spaces).

    - `sampled/*`, `full/*`: the target against the stored negatives / every item but the
      evaluation input's (the headline);
    - `full/cold/*`, `full/warm/*`, `sampled/cold/*`, `sampled/warm/*`: the same over the
      users whose target is unreleased (cold) / released;
    - `new-items/hr@k`: a cold target ranked among the unreleased items only;
    - `top10/unreleased-share`: the share of unreleased items in the top-k lists.

    The scorer gets each user's evaluation input (Split.eval_history): the training
    history at "val", plus the validation item at "test". Users are scored `chunk` at a
    time and only per-user ranks are kept. With no eval users every metric is NaN (the
    keys are still present).
    """
    users = split.eval_users(stage)
    target = split.target(stage)
    negatives = split.test_negatives if stage == "test" else split.val_negatives
    names = ("sampled", "full", "new-items")
    ranks: dict[str, list] = {n: [] for n in names}
    aucs: dict[str, list] = {n: [] for n in names}
    share: list[np.ndarray] = []
    lists = ListStats(split.n_items, item_novelty(split.item_popularity(), split.n_users),
                      spaces, k)
    for ub, s, full in scored_chunks(score, split, stage, chunk):
        top = top_k(full, k)                     # the list the user sees (positive included)
        lists.add(top)
        share.append(split.cold[top].mean(1))
        pos, cands = candidates(s, full, target[ub], negatives[ub], split.cold)
        for name, cand in cands.items():
            ranks[name].append(rank_of_positive(pos, cand))
            aucs[name].append(user_auc(pos, cand))
    cat = {n: (np.concatenate(r) if r else np.zeros(0, np.int64)) for n, r in ranks.items()}
    cat_auc = {n: (np.concatenate(a) if a else np.zeros(0)) for n, a in aucs.items()}
    out = {**summarize("sampled", cat["sampled"], cat_auc["sampled"], k),
           **summarize("full", cat["full"], cat_auc["full"], k)}
    cold = split.cold[target[users]]
    for group, mask in (("cold", cold), ("warm", ~cold)):
        for name in ("full", "sampled"):
            m = summarize(name, cat[name][mask], cat_auc[name][mask], k)
            for metric in (f"hr@{k}", f"ndcg@{k}"):
                out[f"{name}/{group}/{metric}"] = m[f"{name}/{metric}"]
        out[f"{group}/users"] = int(mask.sum())
    m = summarize("new-items", cat["new-items"][cold], cat_auc["new-items"][cold], k)
    out[f"new-items/hr@{k}"], out[f"new-items/ndcg@{k}"] = m[f"new-items/hr@{k}"], \
        m[f"new-items/ndcg@{k}"]
    out[f"top{k}/unreleased-share"] = (float(np.concatenate(share).mean()) if share
                                       else float("nan"))
    out["users"] = len(users)
    return {**out, **lists.summary()}
