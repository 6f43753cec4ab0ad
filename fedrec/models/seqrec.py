"""The default recommender: a SASRec-style causal self-attention encoder over the user's
history, whose item vectors come from the frozen PLM through a small adapter (plus,
optionally, an ID vector that stays zero for items never trained on).

It answers the model protocol (fedrec.models.protocol). Everything in the nn.Module is
federated. Only Linear, LayerNorm and Embedding layers hold parameters; attention is
written with plain Linear projections.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.models.protocol import Recommender


class TextAdapter(nn.Module):
    """Frozen PLM vector -> d: a linear projection plus a zero-initialised residual MLP.

    Projecting first keeps the per-step cost of scoring the whole catalog small on a
    device (384 x d multiply-adds per item, not 384 x hidden)."""

    def __init__(self, text_dim: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        p = self.proj(e)
        return p + self.mlp(self.norm(p))


class FeatureAdapter(nn.Module):
    """A frozen non-text table (graph, image) -> a vector and a bias added to the item's:
    one linear map, zero-initialised (a new model starts as its text alone). Rows that are
    all zero (items the table has nothing for) add nothing, bias included. gate: the output
    scaled by a learned per-item weight sigmoid(w.x + c) (model.feature-combine)."""

    def __init__(self, width: int, dim: int, gate: bool):
        super().__init__()
        self.proj = nn.Linear(width, dim + 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.gate = nn.Linear(width, 1) if gate else None
        if gate:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.proj(x)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x))
        out = out * (x != 0).any(-1, keepdim=True)
        return out[:, :-1], out[:, -1]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class SeqRec(Recommender):
    """Item side: adapter(E) (item_text) + an ID part (id_embeddings): the item's ID vector
    and bias where it has been trained on (`known`). id_dropout: the share of items seen
    without their ID part in a training step (item-ID dropout, as DropoutNet), so the text
    path learns to carry an item alone; in those steps a small linear map from the text
    (`id_from_text`, with text and IDs both) stands in for the dropped ID vector and bias,
    which keeps the steps close to the full model's (federated, a zero stand-in trained a
    weaker model). An item nobody has interacted with yet (unreleased, or added to
    the catalog after training) is scored through its text alone, which ranks new items
    among themselves better than the map's stand-in does, plus new_item_bias: an exposure
    setting, the offset that decides how much of the top-10 lists new items take (their
    text-alone scores sit below the trained items', whose ID parts add to theirs). User
    side: causal self-attention over the last max_len items of the history.

    extras: (name, width) of further frozen tables (a knowledge graph, images), which sit
    after the text's text_dim columns of E, each through its own FeatureAdapter, summed
    (or gated) into the item's vector and bias; the ID stand-in reads all of E."""

    item_side = ("adapter.", "text_bias.", "id_emb.", "id_bias.", "id_from_text.", "features.")
    id_tables = ("id_emb.", "id_bias.")

    def __init__(self, text_dim: int, n_items: int, *, dim: int = 64, hidden: int = 128,
                 layers: int = 2, heads: int = 1, max_len: int = 50, dropout: float = 0.2,
                 item_text: bool = True, id_embeddings: bool = True, id_dropout: float = 0.0,
                 new_item_bias: float = 0.0, extras: tuple = (), combine: str = "sum"):
        super().__init__()
        self.text_dim, self.extras = text_dim, tuple(extras)
        self.features = nn.ModuleDict({name: FeatureAdapter(width, dim, combine == "gate")
                                       for name, width in self.extras}) if extras else None
        self.id_dropout = id_dropout if item_text else 0.0
        if not (item_text or id_embeddings):
            raise ValueError("SeqRec needs item text, ID embeddings or both")
        self.n_items, self.max_len = n_items, max_len
        self.adapter = TextAdapter(text_dim, dim, hidden, dropout) if item_text else None
        self.text_bias = nn.Linear(text_dim, 1) if item_text else None
        self.id_emb = nn.Embedding(n_items, dim) if id_embeddings else None
        self.id_bias = nn.Embedding(n_items, 1) if id_embeddings else None
        if id_embeddings:
            nn.init.zeros_(self.id_bias.weight)
            if item_text:
                nn.init.zeros_(self.id_emb.weight)
            else:
                nn.init.normal_(self.id_emb.weight, std=dim ** -0.5)
        full = text_dim + sum(w for _, w in self.extras)
        self.id_from_text = (nn.Linear(full, dim + 1) if item_text and id_embeddings
                             else None)
        self.new_item_bias = new_item_bias if self.id_from_text is not None else 0.0
        if item_text:
            nn.init.zeros_(self.text_bias.weight)
            nn.init.zeros_(self.text_bias.bias)
        if self.id_from_text is not None:  # starts as no ID part at all, as before training
            nn.init.zeros_(self.id_from_text.weight)
            nn.init.zeros_(self.id_from_text.bias)
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.emb_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, dropout) for _ in range(layers))
        self.out_norm = nn.LayerNorm(dim)

    # -- item side ----------------------------------------------------------------------
    def item_table(self, E: torch.Tensor, idx: torch.Tensor | None = None):
        """E [N, text_dim] rows of items idx [N] (None: the whole catalog, in order)
        -> h [N, d], b [N]."""
        if idx is None:
            idx = torch.arange(self.n_items)
        h = b = 0.0
        if self.adapter is not None:
            T = E[:, :self.text_dim]
            h, b = self.adapter(T), self.text_bias(T).squeeze(-1)
            start = self.text_dim
            for name, width in self.extras:
                v, vb = self.features[name](E[:, start:start + width])
                h, b, start = h + v, b + vb, start + width
        if self.id_emb is not None:
            v, vb = self.id_emb(idx), self.id_bias(idx).squeeze(-1)
            keep = self.known[idx]
            if self.training and self.id_dropout > 0:
                # Item-ID dropout (as DropoutNet): in each step a random share of items is
                # seen through its text alone, so the text path (and the map) learns to
                # stand in for the ID part an unreleased item will not have.
                keep = keep & (torch.rand(len(idx)) >= self.id_dropout)
            if self.id_from_text is not None:
                new = ~self.known[idx]  # no trained rows, never a target: text alone + offset
                v, vb = v * keep[:, None], torch.where(new, self.new_item_bias, vb * keep)
                if self.training:  # ID-dropped known items: the map's stand-in
                    g, dropped = self.id_from_text(E), ~keep & ~new
                    v = torch.where(dropped[:, None], g[:, :-1], v)
                    vb = torch.where(dropped, g[:, -1], vb)
            else:  # IDs alone: an unknown item keeps its untrained row
                keep = keep | ~self.known[idx]
                v, vb = v * keep[:, None], vb * keep
            h, b = h + v, b + vb
        return h, b

    # -- user side ----------------------------------------------------------------------
    def states(self, h_items: torch.Tensor, seq: torch.Tensor, user=None) -> torch.Tensor:
        """Causal self-attention over seq [B, L] (left-padded) read through the item table
        h_items [N, d] -> states [B, L, d]."""
        L = seq.shape[1]
        valid = seq >= 0
        x = torch.where(valid[..., None], h_items[seq.clamp_min(0)], 0.0)
        # Positions count back from the last item, so the most recent item always has
        # position 0 whatever the padding.
        pos = (L - 1 - torch.arange(L)).clamp_max(self.max_len - 1)
        x = self.drop(self.emb_norm(x + self.pos(pos)[None]))
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        # Each position also sees itself, so a padded row never has an all-masked softmax.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
        for block in self.blocks:
            x = block(x, mask)
        return self.out_norm(x)
