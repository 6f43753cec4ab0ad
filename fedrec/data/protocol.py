"""The evaluation protocol of DESIGN.md, the same for every method.

- Leave-one-out by time: last interaction = test, second-to-last = validation, rest =
  train; users with fewer than 3 interactions train only.
- Cold-start items: a fixed fraction of items is not yet released at training time: all
  its interactions are removed from training, and it is never a training negative nor in
  a training softmax (a device cannot know an item that does not exist yet). At
  evaluation it is a candidate like any other.
- Training negatives: uniform over released items not in the user's *training* items.
  The validation/test items may be drawn (a device does not know its future).
- Evaluation input: the training history at validation; the training history plus the
  validation item at test (it lies in the past then). Every method gets the same input.
- Sampled ranking: the held-out item vs `eval-negatives` items the user never touched,
  drawn once with the split seed and stored. Full ranking: vs every item but the
  evaluation input's items.
The split is computed once per (dataset, cold fraction, seed, negatives) and cached.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from fedrec.data.datasets import Dataset, data_home
from fedrec.errors import FedrecError
from fedrec.files import atomic_path
from fedrec.ranking.diversity import ListStats, item_novelty, top_k, unit_rows
from fedrec.ranking.metrics import rank_of_positive, summarize, user_auc


@dataclass(frozen=True)
class Split:
    n_items: int
    train_ptr: np.ndarray   # int64 [n_users + 1]: user u's train items are
    train_items: np.ndarray  # train_items[train_ptr[u]:train_ptr[u+1]], in time order
    val: np.ndarray         # int64 [n_users], -1 = none
    test: np.ndarray        # int64 [n_users], -1 = none
    cold: np.ndarray        # bool [n_items]
    val_negatives: np.ndarray   # int64 [n_users, K], -1 = padding
    test_negatives: np.ndarray  # int64 [n_users, K]

    @property
    def n_users(self) -> int:
        return len(self.val)

    def history(self, u: int) -> np.ndarray:
        return self.train_items[self.train_ptr[u]:self.train_ptr[u + 1]]

    @property
    def released(self) -> np.ndarray:
        """bool [n_items]: items that exist at training time (all but the cold ones)."""
        return ~self.cold

    def eval_history(self, u: int, stage: str) -> np.ndarray:
        """The model's input when ranking for `stage`: the training history, plus the
        validation item at test (time order)."""
        h = self.history(u)
        v = int(self.val[u])
        return np.append(h, v) if stage == "test" and v >= 0 else h

    @property
    def train_users(self) -> np.ndarray:
        """User index of every training interaction (aligned with train_items)."""
        return np.repeat(np.arange(self.n_users), np.diff(self.train_ptr))

    def eval_users(self, stage: str) -> np.ndarray:
        """Users with a held-out item for `stage` and a non-empty training history."""
        target = self.target(stage)
        return np.flatnonzero((target >= 0) & (np.diff(self.train_ptr) > 0))

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.train_items, minlength=self.n_items)

    def target(self, stage: str) -> np.ndarray:
        """int64 [n_users]: each user's held-out item for `stage`, -1 = none."""
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        return self.test if stage == "test" else self.val

    # Cached because training samples negatives every epoch; cached_property writes to
    # __dict__ directly, so it works on a frozen dataclass.
    @cached_property
    def _train_keys(self) -> np.ndarray:
        return np.sort(self.train_users * self.n_items + self.train_items)

    def subset(self, users: np.ndarray) -> "Split":
        """The same split restricted to `users` (renumbered 0..len-1 in that order): each
        keeps its training history, held-out items and evaluation negatives; the catalog
        and its cold items stay as they are."""
        users = np.asarray(users, np.int64)
        parts = [self.history(u) for u in users]
        ptr = np.concatenate([[0], np.cumsum([len(h) for h in parts])]).astype(np.int64)
        items = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return Split(self.n_items, ptr, items, self.val[users], self.test[users], self.cold,
                     self.val_negatives[users], self.test_negatives[users])

    def in_train(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Broadcast mask: is `items` one of `users`' training items?"""
        keys = self._train_keys
        q = np.asarray(users, np.int64) * self.n_items + np.asarray(items, np.int64)
        if not len(keys):
            return np.zeros(q.shape, bool)
        return keys[np.minimum(np.searchsorted(keys, q), len(keys) - 1)] == q


def make_split(ds: Dataset, cold_fraction: float, seed: int, eval_negatives: int,
               cache_dir: str = "") -> Split:
    path = (data_home(cache_dir) / "splits" /
            f"{ds.name}-{ds.fingerprint()}-c{cold_fraction}-s{seed}-n{eval_negatives}.npz")
    if path.is_file():
        cached = _load_cached(path, ds, eval_negatives)
        if cached is not None:
            return cached
    split = _compute_split(ds, cold_fraction, seed, eval_negatives)
    with atomic_path(path) as tmp:
        np.savez(tmp, **{name: getattr(split, name) for name in _ARRAYS})
    return split


_ARRAYS = [f.name for f in fields(Split) if f.name != "n_items"]


def _load_cached(path: Path, ds: Dataset, k: int) -> Split | None:
    """The stored split, or None if it is corrupt or stale (then it is recomputed)."""
    try:
        with np.load(path) as z:
            s = Split(n_items=ds.n_items, **{name: z[name] for name in _ARRAYS})
    except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
        return None
    n_u = ds.n_users
    ok = (s.train_ptr.shape == (n_u + 1,) and s.val.shape == s.test.shape == (n_u,)
          and s.cold.shape == (ds.n_items,) and s.train_ptr[-1] == len(s.train_items)
          and s.val_negatives.shape == s.test_negatives.shape == (n_u, k))
    return s if ok else None


def population(split: Split, n: int, seed: int) -> Split:
    """The first `n` users of a permutation seeded by `seed` (n = 0: all of them), so
    smaller populations are nested in larger ones: the population study of
    docs/privacy.md (accuracy under user-level DP against the number of users)."""
    if not n or n == split.n_users:
        return split
    if n > split.n_users:
        raise FedrecError(f"config: 'data.users' = {n} exceeds the {split.n_users} users of "
                          "the dataset; use at most that many (0 = every user)")
    order = np.random.default_rng([seed, 0x5EED]).permutation(split.n_users)
    return split.subset(np.sort(order[:n]))


def leave_one_out(items: np.ndarray, cold: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(validation item, test item, training items) of one user's time-ordered history:
    the last two are held out when there are at least 3 (else -1, -1 and all of them);
    unreleased (cold) items never train. The split of every user here and of a real
    device's own history (fedrec/deployment/device.py)."""
    val = test = -1
    if len(items) >= 3:
        val, test, items = int(items[-2]), int(items[-1]), items[:-2]
    return val, test, items[~cold[items]]


def untouched(items: np.ndarray, n_items: int) -> np.ndarray:
    """The evaluation-negative pool of a user: every item outside `items` (all of the
    user's interactions, held-out ones included)."""
    seen = np.zeros(n_items, bool)
    seen[items] = True
    return np.flatnonzero(~seen)


def _compute_split(ds: Dataset, cold_fraction: float, seed: int, k: int) -> Split:
    rng = np.random.default_rng(seed)
    n_u, n_i = ds.n_users, ds.n_items
    cold = np.zeros(n_i, bool)
    cold[rng.choice(n_i, size=round(cold_fraction * n_i), replace=False)] = True
    ptr = np.searchsorted(ds.users, np.arange(n_u + 1))
    val, test = np.full(n_u, -1, np.int64), np.full(n_u, -1, np.int64)
    train = []
    for u in range(n_u):
        val[u], test[u], items = leave_one_out(ds.items[ptr[u]:ptr[u + 1]], cold)  # time order
        train.append(items)
    train_ptr = np.concatenate([[0], np.cumsum([len(t) for t in train])]).astype(np.int64)
    train_items = np.concatenate(train).astype(np.int64) if train else np.zeros(0, np.int64)
    negs = {}
    for stage in ("val", "test"):
        out = np.full((n_u, k), -1, np.int64)
        for u in np.flatnonzero(test >= 0):
            pool = untouched(ds.items[ptr[u]:ptr[u + 1]], n_i)
            take = min(k, len(pool))
            out[u, :take] = rng.choice(pool, size=take, replace=False)
        negs[stage] = out
    return Split(n_i, train_ptr, train_items, val, test, cold, negs["val"], negs["test"])


def sample_negatives(split: Split, users: np.ndarray, per_positive: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[len(users), per_positive] released items outside each user's training items."""
    users = np.asarray(users, np.int64)
    warm = np.flatnonzero(split.released)  # unreleased (cold) items cannot be negatives
    out = warm[rng.integers(0, len(warm), size=(len(users), per_positive))]
    for _ in range(20):  # rejection sampling: uniform over the allowed items
        bad = split.in_train(users[:, None], out)
        if not bad.any():
            return out
        out[bad] = warm[rng.integers(0, len(warm), size=int(bad.sum()))]
    # Only users who touched nearly every item get here: draw from their allowed set.
    bad = split.in_train(users[:, None], out)
    for r in np.flatnonzero(bad.any(1)):
        allowed = np.setdiff1d(warm, split.history(users[r]))
        if not len(allowed):
            raise FedrecError(f"user index {users[r]} has interacted with every item, "
                              "so no training negative exists; drop that user from the data")
        out[r, bad[r]] = rng.choice(allowed, size=int(bad[r].sum()))
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
