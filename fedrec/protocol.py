"""The evaluation protocol of DESIGN.md, the same for every method.

- Leave-one-out by time: last interaction = test, second-to-last = validation, rest =
  train; users with fewer than 3 interactions train only.
- Cold-start items: a fixed fraction of items loses all its training interactions; they
  are new to the catalog at training time, so they are never training negatives either.
- Training negatives: uniform over warm items not in the user's *training* items. The
  validation/test items may be drawn (a device does not know its future).
- Sampled ranking: the held-out item vs `eval-negatives` items the user never touched,
  drawn once with the split seed and stored. Full ranking: vs every item but the user's
  training items.
The split is computed once per (dataset, cold fraction, seed, negatives) and cached.
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from fedrec.data import Dataset, data_home
from fedrec.metrics import ranking_metrics


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
    def train_users(self) -> np.ndarray:
        """User index of every training interaction (aligned with train_items)."""
        return np.repeat(np.arange(self.n_users), np.diff(self.train_ptr))

    def eval_users(self, stage: str) -> np.ndarray:
        target = self.test if stage == "test" else self.val
        return np.flatnonzero((target >= 0) & (np.diff(self.train_ptr) > 0))

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.train_items, minlength=self.n_items)


def make_split(ds: Dataset, cold_fraction: float, seed: int, eval_negatives: int,
               cache_dir: str = "") -> Split:
    path = (data_home(cache_dir) / "splits" /
            f"{ds.name}-{ds.fingerprint()}-c{cold_fraction}-s{seed}-n{eval_negatives}.npz")
    if path.is_file():
        with np.load(path) as z:
            return Split(**{f.name: z[f.name] for f in fields(Split) if f.name != "n_items"},
                         n_items=ds.n_items)
    split = _compute_split(ds, cold_fraction, seed, eval_negatives)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f.name: getattr(split, f.name) for f in fields(Split) if f.name != "n_items"})
    os.replace(tmp, path)
    return split


def _compute_split(ds: Dataset, cold_fraction: float, seed: int, k: int) -> Split:
    rng = np.random.default_rng(seed)
    n_u, n_i = ds.n_users, ds.n_items
    cold = np.zeros(n_i, bool)
    cold[rng.choice(n_i, size=int(round(cold_fraction * n_i)), replace=False)] = True
    ptr = np.searchsorted(ds.users, np.arange(n_u + 1))
    val, test = np.full(n_u, -1), np.full(n_u, -1)
    train = []
    for u in range(n_u):
        items = ds.items[ptr[u]:ptr[u + 1]]
        if len(items) >= 3:
            val[u], test[u], items = items[-2], items[-1], items[:-2]
        train.append(items[~cold[items]])
    lengths = np.array([len(t) for t in train])
    train_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    train_items = np.concatenate(train).astype(np.int64) if train else np.zeros(0, np.int64)
    negs = {}
    for stage in ("val", "test"):
        out = np.full((n_u, k), -1, np.int64)
        for u in range(n_u):
            if test[u] < 0:
                continue
            seen = np.zeros(n_i, bool)
            seen[ds.items[ptr[u]:ptr[u + 1]]] = True
            pool = np.flatnonzero(~seen)
            take = min(k, len(pool))
            out[u, :take] = rng.choice(pool, size=take, replace=False)
        negs[stage] = out
    return Split(n_i, train_ptr, train_items, val, test, cold, negs["val"], negs["test"])


def sample_negatives(split: Split, users: np.ndarray, per_positive: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[len(users), per_positive] warm items outside each user's training items."""
    warm = np.flatnonzero(~split.cold)
    train_keys = np.sort(split.train_users * split.n_items + split.train_items)
    out = warm[rng.integers(0, len(warm), size=(len(users), per_positive))]
    for _ in range(100):
        bad = np.isin(users[:, None] * split.n_items + out, train_keys)
        if not bad.any():
            return out
        out[bad] = warm[rng.integers(0, len(warm), size=int(bad.sum()))]
    raise ValueError("cannot sample negatives: a user has interacted with every warm item")


Scorer = Callable[[np.ndarray], np.ndarray]  # users [B] -> scores [B, n_items]


def evaluate(score: Scorer, split: Split, stage: str = "test", k: int = 10,
             chunk: int = 512) -> dict[str, float]:
    """Sampled, full and cold-start ranking metrics with the DESIGN.md keys."""
    users = split.eval_users(stage)
    target = (split.test if stage == "test" else split.val)
    negatives = split.test_negatives if stage == "test" else split.val_negatives
    pos, samp, full = [], [], []
    for start in range(0, len(users), chunk):
        ub = users[start:start + chunk]
        s = np.asarray(score(ub), dtype=np.float64)
        rows = np.arange(len(ub))
        p = s[rows, target[ub]]
        neg = negatives[ub]
        samp.append(np.where(neg >= 0, s[rows[:, None], np.maximum(neg, 0)], -np.inf))
        f = s.copy()
        for r, u in enumerate(ub):
            f[r, split.history(u)] = -np.inf
        f[rows, target[ub]] = -np.inf
        full.append(f)
        pos.append(p)
    if not len(users):
        return {}
    pos_a, samp_a, full_a = np.concatenate(pos), np.concatenate(samp), np.concatenate(full)
    cold = split.cold[target[users]]
    out = {**ranking_metrics("sampled", pos_a, samp_a, k), **ranking_metrics("full", pos_a, full_a, k)}
    for name, mask in (("cold", cold), ("warm", ~cold)):
        m = ranking_metrics(name, pos_a[mask], samp_a[mask], k)
        out[f"{name}/hr@{k}"], out[f"{name}/ndcg@{k}"] = m[f"{name}/hr@{k}"], m[f"{name}/ndcg@{k}"]
        out[f"{name}/users"] = int(mask.sum())
    out["users"] = int(len(users))
    return out
