"""Models: frozen-PLM item adapters with a history-pooled user tower (or, with pooling
"none", the user-local embedding as the user vector), and FedMF.

Both answer the same questions (RecBole style):
  items(E, idx)           -> h_i [N, d], b_i [N], attention logit a_i [N]
  users(pooled, local)    -> h_u [B, d]
  score = <h_u, h_i> + b_i, and r_ui = sigmoid(score).

Everything inside the nn.Module is *federated* (what a client uploads). The user-local
residual embedding lives outside it (a table centrally, one vector in a device's
context.state) so that it can never end up in an upload. Only Linear/Embedding/LayerNorm
layers are used, so Opacus' ModuleValidator accepts both models.
"""

import math

import torch
from torch import nn


class Adapter(nn.Module):
    """MLP with a linear skip: in_dim -> out_dim, initialised near the skip path.

    The MLP's last layer starts at zero and the skip is an orthogonal map (the identity
    when in_dim == out_dim), as adapters usually are: the untrained model already scores
    by text similarity between an item and the user's history, so federated training
    starts from a useful content model instead of noise.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))
        self.skip = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        if in_dim == out_dim:
            nn.init.eye_(self.skip.weight)
        else:
            nn.init.orthogonal_(self.skip.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.skip(x)


class ItemTable:
    """The item-side question SeqRec answers (`item_table`), for the v1 models too:
    every model scores <h_u, h_i> + b_i, so callers such as the audit need no case."""

    def item_table(self, E: torch.Tensor, idx: torch.Tensor):
        """E [N, text_dim] rows of items idx [N] -> h [N, d], b [N]."""
        h, b, _ = self.items(E, idx)
        return h, b


class TextRec(ItemTable, nn.Module):
    """Item side from frozen text embeddings; user side pooled from the user's history.

    pooling "none": no user tower at all (no attention, no user adapter): h_u is the
    user-local embedding alone, trained on the device and never uploaded, as in FedMF,
    while items are still scored from their text (cold items included). The user vector
    then does not read the history, so sample-level DP-SGD holds as stated
    (fedrec/privacy/dpsgd.py); it needs model.user-embedding = true.

    id_embeddings adds a learned per-item vector and bias (a hybrid item side): it helps
    warm items, but its update rows name the items a user touched, so it must be protected
    by DP or SecAgg (DESIGN.md, privacy model).
    """

    def __init__(self, text_dim: int, n_items: int, dim: int = 64, hidden: int = 256,
                 dropout: float = 0.1, pooling: str = "attention", id_embeddings: bool = False):
        super().__init__()
        self.item_adapter = Adapter(text_dim, hidden, dim, dropout)
        self.item_bias = nn.Linear(text_dim, 1)  # its bias is the global b of the score
        nn.init.zeros_(self.item_bias.weight)
        nn.init.zeros_(self.item_bias.bias)
        self.uses_history = pooling != "none"  # instance-level: pooling none reads no history
        self.attention = (nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))
                          if pooling == "attention" else None)
        self.user_adapter = Adapter(dim, hidden, dim, dropout) if self.uses_history else None
        if self.user_adapter is not None:
            # No federated bias on h_u: the user-local residual is added right there, so
            # such a bias would get exactly the residual's gradient and its uploaded update
            # would equal the residual's (a copy of a user-local parameter leaving the device).
            self.user_adapter.mlp[-1].register_parameter("bias", None)
        self.id_emb = nn.Embedding(n_items, dim) if id_embeddings else None
        self.id_bias = nn.Embedding(n_items, 1) if id_embeddings else None
        if id_embeddings:
            nn.init.zeros_(self.id_emb.weight)
            nn.init.zeros_(self.id_bias.weight)

    def items(self, emb: torch.Tensor, idx: torch.Tensor):
        """emb [N, text_dim] (rows of E for idx), idx [N] -> h [N, d], b [N], a [N]."""
        h = self.item_adapter(emb)
        b = self.item_bias(emb).squeeze(-1)
        if self.id_emb is not None:
            h = h + self.id_emb(idx)
            b = b + self.id_bias(idx).squeeze(-1)
        a = self.attention(h).squeeze(-1) if self.attention is not None else torch.zeros_like(b)
        return h, b, a

    def users(self, pooled: torch.Tensor | None, local: torch.Tensor | None) -> torch.Tensor:
        if self.user_adapter is None:  # pooling "none": the user-local embedding alone
            return local
        h = self.user_adapter(pooled)
        return h if local is None else h + local


class FedMF(ItemTable, nn.Module):
    """ID-based peer: item vectors and biases are federated, the user vector is local."""

    uses_history = False

    def __init__(self, n_items: int, dim: int = 64):
        super().__init__()
        self.item_emb = nn.Embedding(n_items, dim)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)

    def items(self, emb: torch.Tensor | None, idx: torch.Tensor):
        b = self.item_bias(idx).squeeze(-1)
        return self.item_emb(idx), b, torch.zeros_like(b)

    def users(self, pooled: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        return local


# Each model kind's per-item ID tables (one row per catalog item), by array-name prefix.
ID_TABLES = {"seq": ("id_emb.", "id_bias."), "text": ("id_emb.", "id_bias."),
             "fedmf": ("item_emb.", "item_bias.")}


def build_model(cfg, text_dim: int, n_items: int) -> nn.Module:
    m = cfg.model
    if m.kind == "seq":
        from fedrec.models.seqrec import SeqRec

        return SeqRec(text_dim, n_items, dim=m.dim, hidden=m.hidden, layers=m.layers,
                      heads=m.heads, max_len=m.max_len, dropout=m.dropout,
                      item_text=m.item_text, id_embeddings=m.id_embeddings,
                      id_dropout=m.id_dropout)
    if m.kind == "fedmf":
        return FedMF(n_items, m.dim)
    return TextRec(text_dim, n_items, m.dim, m.hidden, m.dropout, m.pooling, m.id_embeddings)


def model_from_arrays(cfg, text_dim: int, n_items: int, arrays) -> nn.Module:
    """The model of `cfg` holding `arrays` (numpy arrays or Flower Arrays, by parameter
    name; copied), in eval mode. Built on the meta device: no random initialisation runs
    (an orthogonal init is a QR per call) and no global RNG state is drawn. A training
    step builds its own model instead (fedrec.federation.local: its init is part of the seeded
    stream). Missing or misshapen arrays raise RuntimeError (strict loading)."""
    with torch.device("meta"):
        model = build_model(cfg, text_dim, n_items)
    model.load_state_dict({k: torch.tensor(v.numpy() if hasattr(v, "numpy") else v,
                                           dtype=torch.float32) for k, v in arrays.items()},
                          assign=True)
    return model.eval()


def uses_local_user(cfg) -> bool:
    return cfg.model.kind == "fedmf" or (cfg.model.kind == "text" and cfg.model.user_embedding)


def reads_history(cfg) -> bool:
    """Whether the user vector is computed from the history by federated layers (TextRec
    with attention/mean pooling). Otherwise (FedMF, TextRec pooling "none") it is the
    user-local embedding alone: only the device has it, so the server cannot evaluate,
    `fedrec recommend` cannot rank, and sample-level DP needs no "history pool public"."""
    return cfg.model.kind == "seq" or (cfg.model.kind == "text" and cfg.model.pooling != "none")


def init_local_users(n: int, dim: int, kind: str, generator: torch.Generator | None = None,
                     pooling: str = "attention"):
    """User-local vectors: random where they are the whole user vector (MF, TextRec with
    pooling "none"; breaks symmetry), zero residuals on a history-pooled TextRec."""
    if kind == "fedmf" or pooling == "none":
        return torch.randn(n, dim, generator=generator) * 0.1
    return torch.zeros(n, dim)


def pool_leave_one_out(h: torch.Tensor, a: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """One user's history (h [L, d], a [L], its items in history order) pooled once per
    row, row r leaving out history position exclude[r]: [len(exclude), d]."""
    at = torch.arange(len(a))
    return pool_history(h, a, at, torch.zeros_like(at), 1,
                        torch.zeros(len(exclude), dtype=torch.long), exclude)


def pool_history(h: torch.Tensor, a: torch.Tensor, hist_items: torch.Tensor,
                 hist_seg: torch.Tensor, n_seg: int, rows_seg: torch.Tensor,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Attention-pool each user's history, optionally leaving one item out per row.

    h [n_items, d], a [n_items]: item vectors and attention logits for the whole catalog.
    hist_items [P], hist_seg [P]: the histories as (item, segment) pairs.
    rows_seg [B]: which segment (user) each output row pools; exclude [B]: an item to
    leave out of that row's pool (the positive being scored), or -1 for none.
    Returns pooled [B, d]. Leaving the target out makes training look like testing: the
    held-out item is never in the history it is scored against.
    """
    a_hist = a[hist_items]
    m = torch.full((n_seg,), -math.inf, dtype=a.dtype, device=a.device)
    m = m.scatter_reduce(0, hist_seg, a_hist.detach(), "amax", include_self=True)
    m = torch.nan_to_num(m, neginf=0.0)
    w = torch.exp(a_hist - m[hist_seg])
    s = torch.zeros(n_seg, h.shape[1], dtype=h.dtype, device=h.device).index_add(
        0, hist_seg, w.unsqueeze(-1) * h[hist_items])
    z = torch.zeros(n_seg, dtype=h.dtype, device=h.device).index_add(0, hist_seg, w)
    count = torch.zeros(n_seg, dtype=h.dtype, device=h.device).index_add(
        0, hist_seg, torch.ones_like(w))
    s_rows, z_rows, n_rows = s[rows_seg], z[rows_seg], count[rows_seg]
    if exclude is not None:
        keep = (exclude >= 0).to(h.dtype)
        ex = exclude.clamp_min(0)
        w_ex = torch.exp(a[ex] - m[rows_seg]) * keep
        s_rows = s_rows - w_ex.unsqueeze(-1) * h[ex]
        z_rows = z_rows - w_ex
        n_rows = n_rows - keep
        # Subtracting cancels catastrophically when the left-out item is its segment's
        # only top item (weight 1, the others ~exp(-gap)): pool those rows' remaining
        # items directly, scaled at their own maximum.
        top = a_hist.detach() == m[hist_seg]
        n_top = torch.zeros_like(count).index_add(0, hist_seg, top.to(h.dtype))
        alone = (keep > 0) & (a[ex].detach() == m[rows_seg]) & (n_top[rows_seg] == 1)
        if alone.any():
            sel = torch.isin(hist_seg, rows_seg[alone]) & ~top
            seg2, a2 = hist_seg[sel], a_hist[sel]
            m2 = torch.full_like(m, -math.inf).scatter_reduce(0, seg2, a2.detach(), "amax",
                                                                include_self=True)
            w2 = torch.exp(a2 - torch.nan_to_num(m2, neginf=0.0)[seg2])
            s2 = torch.zeros_like(s).index_add(0, seg2, w2.unsqueeze(-1) * h[hist_items[sel]])
            z2 = torch.zeros_like(z).index_add(0, seg2, w2)
            s_rows = torch.where(alone.unsqueeze(-1), s2[rows_seg], s_rows)
            z_rows = torch.where(alone, z2[rows_seg], z_rows)
    # An empty pool (no history, or a history of one item, left out) gives the zero vector.
    empty = (n_rows < 0.5).unsqueeze(-1)
    return torch.where(empty, 0.0, s_rows / z_rows.clamp_min(1e-6).unsqueeze(-1))
