"""The questions every model answers, and the sequence layout every model reads.

A model (SeqRec, FedMF) is a `Recommender`: an nn.Module holding only *federated*
parameters (what a device uploads), answering (RecBole style)

  item_table(E, idx)              -> h [N, d], b [N]      the item side
  states(h, seq, user)            -> [B, L, d]            the user side at every position
  loss(E, seq, allowed, user)     next-item softmax cross-entropy          -> scalar or [B]
  score_all(E, seq, user)         scores of every catalog item             -> [B, N]
  score_pairs(E, seq, cand, user) scores of candidate items cand [B, C]    -> [B, C]

E [N, text_dim] is the frozen item-text table (never a parameter, never uploaded); seq
[B, L] holds item indices in time order, left-padded with PAD. Scores are
<h_u, h_i> + b_i (r_ui = sigmoid(score)). `user` [B, user_dim] holds user-local vectors:
they live outside the module (a table centrally, one vector on a device) so they can
never enter an upload; a model with user_dim = 0 reads the user from the history alone
and ignores it. Central training, device training (plain and DP-SGD), evaluation,
recommend, explain and audit call only these.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD = -1


class Recommender(nn.Module):
    item_side: tuple[str, ...] = ()  # parameter-name prefixes of what item_table reads
    id_tables: tuple[str, ...] = ()  # per-item tables (one row per catalog item): their
    #                                  update rows name a user's items (DP or SecAgg)
    user_dim = 0                     # width of the user-local vector (0: none)
    max_len: int                     # history items a ranking input holds
    n_items: int

    def new_users(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial user-local vectors [n, user_dim]."""
        return torch.zeros(n, self.user_dim)

    @property
    def known(self) -> torch.Tensor:
        """bool [n_items]: the items with trained ID rows (all, unless `know` says other)."""
        mask = getattr(self, "_known", None)
        return torch.ones(self.n_items, dtype=torch.bool) if mask is None else mask

    def know(self, mask) -> "Recommender":
        """Which items have been trained on (the released ones): public catalog facts,
        held outside the parameters, so never uploaded; None = every item."""
        self._known = None if mask is None else torch.as_tensor(np.asarray(mask, bool))
        return self

    def item_table(self, E: torch.Tensor, idx: torch.Tensor | None = None):
        """E [N, text_dim] rows of items idx [N] (None: the whole catalog, in order)
        -> h [N, d], b [N]."""
        raise NotImplementedError

    def states(self, h: torch.Tensor, seq: torch.Tensor, user: torch.Tensor | None
               ) -> torch.Tensor:
        """Item table h [N, d], seq [B, L] -> user states [B, L, d]: state t has read
        items 0..t of the row (padding positions hold unused values)."""
        raise NotImplementedError

    def forward(self, E, seq, allowed=None, reduction="mean", table=None, user=None, first=0):
        """The training loss (what torch.func and DP-SGD call): see loss."""
        return self.loss(E, seq, allowed, reduction, table, user, first)

    def loss(self, E: torch.Tensor, seq: torch.Tensor, allowed: torch.Tensor | None = None,
             reduction: str = "mean", table=None, user: torch.Tensor | None = None,
             first: int = 0) -> torch.Tensor:
        """Next-item cross-entropy over the catalog at every position of seq [B, L+1]
        (input seq[:, :-1], target seq[:, 1:]; a target counts where both it and its input
        are items, so the first item of a history is never predicted from padding, and
        from target position `first` on: overlapping windows count the earlier ones in
        the window that gives them more context, `windows`).
        allowed [N] bool: the items the softmax may contain (released items); None = all.
        reduction "mean": mean over targets; "row": [B] sum over each row's targets.
        A target that is not allowed would be an infinite loss: callers keep them out.
        table: (h, b) of item_table(E), when the caller computed it (DP-SGD shares one
        item table among its per-row gradients)."""
        h, b = self.item_table(E) if table is None else table
        states = self.states(h, seq[:, :-1], user)
        target = seq[:, 1:]
        keep = target_mask(seq, first)
        logits = states @ h.T + b  # [B, L, N]; no boolean indexing, so torch.func can vmap it
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        ce = F.cross_entropy(logits.flatten(0, 1), target.clamp_min(0).flatten(),
                             reduction="none").view(keep.shape)
        ce = torch.where(keep, ce, 0.0)  # padding's stand-in target may be a disallowed item
        if reduction == "mean":
            return ce.sum() / keep.sum().clamp_min(1)
        return ce.sum(1)

    def user_vectors(self, E: torch.Tensor, seq: torch.Tensor, user=None):
        """seq [B, L] -> (h_u [B, d], item table h [N, d], b [N])."""
        h, b = self.item_table(E)
        return self.states(h, seq, user)[:, -1], h, b

    def score_all(self, E: torch.Tensor, seq: torch.Tensor, user=None) -> torch.Tensor:
        """seq [B, L] (last position = most recent item) -> scores [B, N]."""
        hu, h, b = self.user_vectors(E, seq, user)
        return hu @ h.T + b

    def score_pairs(self, E: torch.Tensor, seq: torch.Tensor, cand: torch.Tensor,
                    user=None) -> torch.Tensor:
        """seq [B, L], cand [B, C] item indices -> scores [B, C]."""
        hu, h, b = self.user_vectors(E, seq, user)
        return torch.einsum("bd,bcd->bc", hu, h[cand]) + b[cand]


# -- sequences ---------------------------------------------------------------------------
def target_mask(seq: torch.Tensor, first: int = 0) -> torch.Tensor:
    """seq [B, L + 1] training rows -> bool [B, L]: the positions `loss` counts (an item
    predicted from an item, never from padding; from target position `first` on)."""
    return (seq[:, 1:] >= 0) & (seq[:, :-1] >= 0) & (torch.arange(seq.shape[1] - 1) >= first)


def last_items(history: np.ndarray, max_len: int) -> np.ndarray:
    """The model input for ranking: the last max_len items, left-padded -> [max_len]."""
    out = np.full(max_len, PAD, np.int64)
    tail = np.asarray(history, np.int64)[-max_len:]
    if len(tail):
        out[-len(tail):] = tail
    return out


def windows(history: np.ndarray, max_len: int, stride: int | None = None) -> np.ndarray:
    """Training rows [W, max_len + 1] of one history: windows of up to L + 1 items ending
    at n, n - s, n - 2s, ... (s = stride, default L). Counting the last s target positions
    of each row (loss's first = L - s) makes every item after the first a target exactly
    once, in the window that reads it with the most context: at least L - s + 1 items
    before it where the history has them, the whole history before it otherwise. s = L:
    disjoint windows, every position counted. Empty for histories shorter than 2."""
    h = np.asarray(history, np.int64)
    rows = [last_items(h[max(0, end - max_len - 1):end], max_len + 1)
            for end in range(len(h), 1, -(stride or max_len))]
    return np.stack(rows) if rows else np.zeros((0, max_len + 1), np.int64)


def blocks(history: np.ndarray, max_len: int) -> np.ndarray:
    """[B, max_len + 1]: the history cut by position into disjoint blocks (left-padded),
    the rows of sample-level DP-SGD (fedrec.privacy.dpsgd); a last block of a single
    item has no target and is dropped."""
    h, size = np.asarray(history, np.int64), max_len + 1
    rows = [last_items(h[k:k + size], size) for k in range(0, len(h), size)
            if len(h[k:k + size]) >= 2]
    return np.stack(rows) if rows else np.zeros((0, size), np.int64)


def stack_rows(histories: list[np.ndarray], max_len: int, stride: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every history's training windows stacked [W, max_len + 1], and the index of the
    history each row comes from [W]."""
    parts = [windows(h, max_len, stride) for h in histories]
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    rows = np.concatenate(parts) if parts else np.zeros((0, max_len + 1), np.int64)
    return rows, owner


def batch_inputs(histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """[len(histories), max_len] model inputs for ranking."""
    return torch.from_numpy(np.stack([last_items(h, max_len) for h in histories])
                            if histories else np.zeros((0, max_len), np.int64))
