"""FedMF, the ID-based peer (Chai et al., 2020): matrix factorisation whose item vectors
and biases are federated while each user's vector stays on their device.

It answers the model protocol (fedrec.models.protocol) like SeqRec and trains the same
way (next-item softmax cross-entropy over the released items, at the same target
positions), but its user state is the user-local vector alone, whatever the history: an
item nobody trained on keeps its random vector and zero bias, and the server, which never
holds user vectors, cannot evaluate or recommend with it.
"""

import torch
from torch import nn

from fedrec.models.protocol import Recommender


class FedMF(Recommender):
    item_side = ("item_emb.", "item_bias.")
    id_tables = item_side

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 50):
        super().__init__()
        self.n_items, self.max_len, self.user_dim = n_items, max_len, dim
        self.item_emb = nn.Embedding(n_items, dim)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)

    def new_users(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random, as the item vectors: a zero user vector would get no gradient."""
        return torch.randn(n, self.user_dim, generator=generator) * 0.1

    def item_table(self, E: torch.Tensor, idx: torch.Tensor | None = None):
        if idx is None:
            return self.item_emb.weight, self.item_bias.weight.squeeze(-1)
        return self.item_emb(idx), self.item_bias(idx).squeeze(-1)

    def states(self, h: torch.Tensor, seq: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """The user vector at every position: MF reads no history."""
        return user[:, None, :].expand(-1, seq.shape[1], -1)
