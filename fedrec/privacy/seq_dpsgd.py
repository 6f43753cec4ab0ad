"""Sample-level DP-SGD for the seq model (privacy.mode = "sample", model.kind = "seq").

Why blocks. The seq model's training windows share history: an item is a target in one
window and context in every later position of it, and consecutive windows overlap by one
item. Clipping a window's gradient would then not bound one interaction's influence (it
reaches several rows and many positions). So under DP the rows are *blocks*: the history
cut by position into consecutive, disjoint runs of up to model.max-len + 1 items, each
read on its own (its first item is context only, the others are targets). No item is in
two rows, rows share no data, and each row's gradient is exactly its block's: torch.func
computes them (vmap over grad), each is clipped to privacy.max-grad-norm C, the clipped
sum gets Gaussian noise N(0, (sigma C)^2) and is divided by the expected batch (q n), as
in fedrec/privacy/dpsgd.py. Rows are Poisson-sampled with q = (windows per step) / n blocks.

What the guarantee covers, honestly:
- Unit of privacy: one block (results and logs say "block"). Any change confined to one
  block — replacing, reordering or removing items inside it — is covered at the ε the
  accountant reports. A single interaction lies in exactly one block, so replacing it is
  covered too; adding or deleting one interaction shifts the boundaries of every later
  block, and that is not covered at ε (group privacy over the blocks it shifts would be).
  Block boundaries depend only on positions (public given the history length).
- Cost: a device's item table is computed once per step and shared by its blocks' per-row
  gradients; its backward pass runs batched over the sampled blocks
  (simulations/bench_dp.py measures the ratio to plain training).
- Everything else is as in fedrec/privacy/dpsgd.py: noise and sampling from the OS's entropy,
  num-examples 1, no training loss in the reply, a cumulative accountant in
  context.state, a device that would pass its target declines the round.
"""

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedrec.models.seqrec import SeqRec, last_items, target_mask

UNIT = "block"  # what privacy.describe names for this path


def blocks(history: np.ndarray, max_len: int) -> np.ndarray:
    """[B, max_len + 1]: the history cut by position into disjoint blocks (left-padded);
    a last block of a single item has no target and is dropped."""
    h, size = np.asarray(history, np.int64), max_len + 1
    rows = [last_items(h[k:k + size], size) for k in range(0, len(h), size)
            if len(h[k:k + size]) >= 2]
    return np.stack(rows) if rows else np.zeros((0, size), np.int64)


ITEM_SIDE = ("adapter.", "text_bias.", "id_emb.", "id_bias.")  # what SeqRec.item_table reads


def clipped_block_sum(model: SeqRec, E: torch.Tensor, rows: torch.Tensor,
                      allowed: torch.Tensor, max_grad_norm: float):
    """Sum over rows [B, L + 1] of each row's gradient (of its mean target loss) clipped to
    max_grad_norm: ({name: tensor}, per-row norms before clipping [B]).

    The item table (adapter over the whole catalog + ID vectors) is computed once, as in
    a plain step (one dropout draw for every row): torch.func takes each row's gradient
    of the encoder and of the table, and one batched backward pass turns the per-row
    table gradients into the item side's per-row gradients."""
    params = dict(model.named_parameters())

    def row_loss(p, table, row):
        seq = row[None]
        targets = target_mask(seq).sum().clamp_min(1)
        return functional_call(model, p, (E, seq, allowed),
                               {"reduction": "row", "table": table})[0] / targets

    if len(rows) == 1:  # one row (most devices have one block): its gradient is the gradient
        g = torch.autograd.grad(row_loss(params, None, rows[0]), list(params.values()),
                                allow_unused=True)
        per_row = {k: (torch.zeros_like(params[k]) if v is None else v)[None]
                   for k, v in zip(params, g)}
    else:
        item_side = [k for k in params if k.startswith(ITEM_SIDE)]
        h, b = model.item_table(E)
        rest = {k: p.detach() for k, p in params.items() if k not in item_side}
        per_row, (g_h, g_b) = vmap(grad(row_loss, argnums=(0, 1)), in_dims=(None, None, 0),
                                   randomness="different")(rest, (h.detach(), b.detach()), rows)
        g = torch.autograd.grad((h, b), [params[k] for k in item_side], (g_h, g_b),
                                is_grads_batched=True, allow_unused=True)
        per_row.update({k: torch.zeros(len(rows), *params[k].shape) if v is None else v
                        for k, v in zip(item_side, g)})
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_row.values()))
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", scale, g) for k, g in per_row.items()}, norms


def dp_train_epoch(model: SeqRec, opt, E: torch.Tensor, rows: np.ndarray,
                   allowed: torch.Tensor, q: float, noise_multiplier: float,
                   max_grad_norm: float, rng: np.random.Generator,
                   noise_generator: torch.Generator | None = None) -> tuple[float, int]:
    """One epoch of DP-SGD over a device's blocks rows [n, L + 1] at sample rate q;
    returns (q, steps) for the accountant."""
    model.train()
    n = len(rows)
    steps = max(1, round(1.0 / q))
    std = noise_multiplier * max_grad_norm
    params = dict(model.named_parameters())
    for _ in range(steps):
        pick = np.flatnonzero(rng.random(n) < q)
        sums = (clipped_block_sum(model, E, torch.from_numpy(rows[pick]), allowed,
                                  max_grad_norm)[0] if len(pick) else {})
        for name, p in params.items():
            s = sums[name] if name in sums else torch.zeros_like(p)
            p.grad = (s + std * torch.randn(p.shape, generator=noise_generator)) / (q * n)
        opt.step()
    return q, steps
