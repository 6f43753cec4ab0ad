"""The evaluation protocol (docs/protocol.md), the same for every method: the split.

- Leave-one-out by time: last interaction = test, second-to-last = validation, rest =
  train; users with fewer than 3 interactions train only. Interactions sharing a
  timestamp are ordered by a seeded random permutation of the catalog (`tie_ranks`,
  data.tie-order = "random"), not by item id, which would make the test item the
  highest id of its burst.
- Cold-start items: a fixed fraction of items is not yet released at training time: all
  its interactions are removed from training, and it is never in a training softmax (a
  device cannot know an item that does not exist yet). At evaluation it is a candidate
  like any other.
- Evaluation input: the training history at validation; the training history plus the
  validation item at test (it lies in the past then). Every method gets the same input.
- Sampled ranking: the held-out item vs `eval-negatives` items the user never touched,
  drawn once with the split seed and stored. Full ranking: vs every item but the
  evaluation input's items.
The split is computed once per (dataset, cold fraction, seed, negatives) and cached.
`ClientData` is what one device holds of it (its own history, held-out items and
candidates, and the public catalog's released items); fedrec.data.evaluate scores it all.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fedrec.data.datasets import Dataset
from fedrec.errors import FedrecError
from fedrec.files import atomic_path, data_home


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


@dataclass(frozen=True)
class ClientData:
    """One user's private data plus the public catalog facts a device may know."""

    history: np.ndarray          # int64 [L] training items, time order
    val: int                     # held-out items (-1 = none)
    test: int
    val_negatives: np.ndarray    # int64 [K] sampled-ranking candidates (-1 = padding)
    test_negatives: np.ndarray
    warm: np.ndarray             # bool [n_items]: released at training time (the softmax)
    test_is_cold: bool

    @classmethod
    def from_split(cls, split: Split, u: int) -> "ClientData":
        test = int(split.test[u])
        # Cold items are not released yet: never in a training softmax.
        return cls(split.history(u).copy(), int(split.val[u]), test, split.val_negatives[u],
                   split.test_negatives[u], split.released.copy(),
                   bool(test >= 0 and split.cold[test]))

    def eval_history(self, stage: str) -> np.ndarray:
        """The input when ranking for `stage` (the protocol's Split.eval_history)."""
        h = self.history
        return np.append(h, self.val) if stage == "test" and self.val >= 0 else h

    @property
    def n_items(self) -> int:
        return len(self.warm)


def tie_ranks(n_items: int, seed: int) -> np.ndarray:
    """int64 [n_items]: each item's rank in a permutation of the catalog seeded by the split
    seed; interactions sharing a timestamp are ordered by it (the same on a device, which
    holds the same catalog)."""
    return np.random.default_rng([seed, 0x71E5]).permutation(n_items)


def time_order(items: np.ndarray, times: np.ndarray, ranks: np.ndarray | None) -> np.ndarray:
    """One user's items by time, equal times by `ranks` (None: as given)."""
    keys = (np.arange(len(items)), times) if ranks is None else (ranks[items], times)
    return np.asarray(items)[np.lexsort(keys)]


def make_split(ds: Dataset, cold_fraction: float, seed: int, eval_negatives: int,
               cache_dir: str = "", tie_order: str = "random") -> Split:
    tag = "" if tie_order == "item-id" else f"-t{tie_order}"
    path = (data_home(cache_dir) / "splits" / f"{ds.name}-{ds.fingerprint()}-c{cold_fraction}"
            f"-s{seed}-n{eval_negatives}{tag}.npz")
    if path.is_file():
        cached = _load_cached(path, ds, eval_negatives)
        if cached is not None:
            return cached
    split = _compute_split(ds, cold_fraction, seed, eval_negatives, tie_order)
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
    device's own history (fedrec/data/device.py)."""
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


def _compute_split(ds: Dataset, cold_fraction: float, seed: int, k: int,
                   tie_order: str = "random") -> Split:
    rng = np.random.default_rng(seed)
    n_u, n_i = ds.n_users, ds.n_items
    cold = np.zeros(n_i, bool)
    cold[rng.choice(n_i, size=round(cold_fraction * n_i), replace=False)] = True
    ptr = np.searchsorted(ds.users, np.arange(n_u + 1))
    ranks = tie_ranks(n_i, seed) if tie_order == "random" else None  # else: by item id
    val, test = np.full(n_u, -1, np.int64), np.full(n_u, -1, np.int64)
    train = []
    for u in range(n_u):
        at = slice(ptr[u], ptr[u + 1])
        val[u], test[u], items = leave_one_out(time_order(ds.items[at], ds.times[at], ranks),
                                               cold)
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
