"""The private recommender, trained (model.kind = "profile"): one DP popularity release and
the device's PLM profile, plus a small learned low-rank term (docs/privacy.md).

    score(u, i) = g_p prior_i + g_t <p_u, e_i> + <A p_u, B e_i>

- e_i: item i's frozen PLM vector scaled to unit length; p_u: the mean of e over the
  user's last `last` items (at every position of a training row), what the device alone
  computes from its history;
- prior_i: log(max(noisy count_i, 1)) from a DP popularity release (model.prior names the
  file `fedrec baseline popularity --epsilon E --device-text --json F` wrote; its noisy
  counts, unit, ε and σ): public once released, so a constant here, never a parameter
  and never uploaded; the release's ε is composed into the run's (fedrec.privacy.
  accounting.user_epsilon). Items the model does not know (unreleased: nobody's counts
  include them) take model.new-item-bias instead;
- g_p, g_t (`gain`, starting at 1 and at the release file's text weight) and A, B
  [model.dim, text_dim] are the federated parameters: A starts at zero, so round 0 is the
  release's own recommender exactly, and training learns only what the noise lets it
  add. 2 + 2 x model.dim x text_dim coordinates: what DP noises is small.
"""

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedrec.errors import FedrecError
from fedrec.models.protocol import Recommender


@lru_cache(maxsize=8)
def read_release(path: str) -> dict:
    """The release a result file of `fedrec baseline popularity --device-text` holds."""
    try:
        res = json.loads(Path(path).expanduser().read_text())
        rel, p = res["release"], res["privacy"]
        text = p["device-text"]
        return {"counts": np.asarray(rel["noisy-counts"], np.float64),
                "noise-multiplier": float(p["noise-multiplier"]), "delta": float(p["delta"]),
                "epsilon": float(p["epsilon-spent"]), "unit": p["unit"],
                "weight": float(text["weight"]), "last": int(text["last"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedrecError(f"config: 'model.prior' = '{path}' is not a release file of "
                          "`fedrec baseline popularity --epsilon E --device-text --json FILE` "
                          f"({type(exc).__name__}: {exc}); write one with that command") from None


class ProfileRec(Recommender):
    item_side = ("B",)
    id_tables = ()

    def __init__(self, text_dim: int, n_items: int, *, prior: str, dim: int = 16,
                 max_len: int = 50, new_item_bias: float = 0.0):
        super().__init__()
        rel = read_release(prior)
        if len(rel["counts"]) != n_items:
            raise FedrecError(f"config: 'model.prior' = '{prior}' counts {len(rel['counts'])} "
                              f"items, the catalog has {n_items}; release it for this dataset")
        self.n_items, self.max_len, self.last = n_items, max_len, rel["last"]
        self.new_item_bias = new_item_bias
        self.log_counts = torch.log(torch.from_numpy(rel["counts"]).clamp_min(1.0)).float()
        self.A = nn.Parameter(torch.zeros(dim, text_dim))
        self.B = nn.Parameter(torch.randn(dim, text_dim) / math.sqrt(text_dim))
        self.gain = nn.Parameter(torch.tensor([1.0, rel["weight"]]))

    def item_table(self, E: torch.Tensor, idx: torch.Tensor | None = None):
        """h_i = [B e_i, e_i] (the user side weighs them), b_i = g_p prior_i."""
        idx = torch.arange(self.n_items) if idx is None else idx
        e = E / E.norm(dim=1, keepdim=True).clamp_min(1e-12)
        prior = torch.where(self.known[idx], self.log_counts[idx],
                            torch.tensor(self.new_item_bias))
        return torch.cat([e @ self.B.T, e], dim=1), self.gain[0] * prior

    def states(self, h: torch.Tensor, seq: torch.Tensor, user=None) -> torch.Tensor:
        """p_t, the mean unit PLM vector of the last `last` items up to position t, as
        [A p_t, g_t p_t]: with h_i = [B e_i, e_i] the dot product is the score."""
        rank = self.A.shape[0]
        valid = (seq >= 0).float()
        e = h[seq.clamp_min(0)][..., rank:] * valid[..., None]
        sums, counts = e.cumsum(1), valid.cumsum(1)
        k = self.last
        if seq.shape[1] > k:  # subtract what left the window of the last k positions
            sums = sums - nn.functional.pad(sums, (0, 0, k, 0))[:, :-k]
            counts = counts - nn.functional.pad(counts, (k, 0))[:, :-k]
        p = sums / counts.clamp_min(1.0)[..., None]
        return torch.cat([p @ self.A.T, self.gain[1] * p], dim=-1)
