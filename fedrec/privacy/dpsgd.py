"""Sample-level DP-SGD on the device (privacy.mode = "sample"), one path for every model;
its accounting is fedrec.privacy.accounting.

Rows. A model's training windows share history: an item is a target in one window and
context in every later position of it, and consecutive windows overlap by one item.
Clipping a window's gradient would then not bound one interaction's influence. So under
DP the rows are *blocks*: the history cut by position into consecutive, disjoint runs of
up to model.max-len + 1 items, each read on its own (its first item is context only, the
others are targets; fedrec.models.protocol.blocks). No item is in two rows and each row's
gradient is exactly its block's. Rows are Poisson-sampled with rate q = (rows per step) /
n blocks; each row's gradient of model.loss (federated parameters and the user-local
vector, if the model has one, as one vector) is clipped to privacy.max-grad-norm C, the
clipped gradients are summed, Gaussian noise N(0, (sigma C)^2) is added to every
coordinate and the sum is divided by the expected batch q n (Opacus' convention).
torch.func takes the per-row gradients; the item table (adapter over the whole catalog,
ID vectors) is computed once per step, as in a plain step, and one batched backward pass
turns the per-row table gradients into the item side's per-row gradients. The frozen PLM
never runs (E is a constant input).

What the guarantee covers, honestly:
- Unit of privacy: one block (results and logs say "block"). Any change confined to one
  block (replacing, reordering or removing items inside it) is covered at the ε the
  accountant reports. A single interaction lies in exactly one block, so replacing it is
  covered too; adding or deleting one interaction shifts the boundaries of every later
  block, and that is not covered at ε (group privacy over the blocks it shifts would be).
  Block boundaries depend only on positions (public given the history length).
- The noise and the Poisson sampling come from the operating system's entropy
  (secret_randomness), not from the seeds a device's other randomness uses: those
  (train.seed, user, round) are known to the server, which could replay the noise.
  Simulated DP runs therefore do not repeat bit for bit. Floating-point attacks on the
  Gaussian sampler (Mironov, 2012) are not defended against.
- What a reply releases besides the DP-trained parameters must not depend on the data:
  num-examples is 1 (the true count would change with one interaction) and no training
  loss is reported. Timing (how long the update took) is not protected.
- The accountant composes over every local step of every round the device joined: its
  history (noise_multiplier, sample_rate, steps) lives in context.state, so ε is
  cumulative. sigma is solved for the expected participation; a device sampled more often
  declines the round that would take it past the target (an error reply the server drops
  and counts), so no device's ε exceeds privacy.target-epsilon.
"""

import secrets

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedrec.models.protocol import Recommender, target_mask

UNIT = "block"  # what privacy.describe names for this path


def clipped_grad_sum(model: Recommender, E: torch.Tensor, rows: torch.Tensor,
                     allowed: torch.Tensor, max_grad_norm: float,
                     user: torch.Tensor | None = None):
    """Sum over rows [B, L + 1] of each row's gradient (of its mean target loss) clipped to
    max_grad_norm, jointly over the federated parameters and the user-local vector user
    [user_dim] (None: the model has none): ({name: tensor}, the user vector's sum,
    per-row norms before clipping [B])."""
    params = dict(model.named_parameters())
    u = torch.zeros(0) if user is None else user.detach()

    def row_loss(p, table, u, row):
        seq = row[None]
        targets = target_mask(seq).sum().clamp_min(1)
        return functional_call(model, p, (E, seq, allowed),
                               {"reduction": "row", "table": table, "user": u[None]})[0] / targets

    if len(rows) == 1:  # one row (most devices have one block): its gradient is the gradient
        leaves = [*params.values(), u.requires_grad_()]
        g = torch.autograd.grad(row_loss(params, None, u, rows[0]), leaves, allow_unused=True)
        per_row = {k: (torch.zeros_like(leaf) if v is None else v)[None]
                   for k, leaf, v in zip([*params, None], leaves, g)}
        g_user = per_row.pop(None)
    else:
        item_side = [k for k in params if k.startswith(model.item_side)]
        h, b = model.item_table(E)
        rest = {k: p.detach() for k, p in params.items() if k not in item_side}
        per_row, (g_h, g_b), g_user = vmap(
            grad(row_loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0),
            randomness="different")(rest, (h.detach(), b.detach()), u, rows)
        g = torch.autograd.grad((h, b), [params[k] for k in item_side], (g_h, g_b),
                                is_grads_batched=True, allow_unused=True)
        per_row.update({k: torch.zeros(len(rows), *params[k].shape) if v is None else v
                        for k, v in zip(item_side, g)})
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_row.values())
                       + g_user.pow(2).sum(1))
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = {k: torch.einsum("b,b...->...", scale, g) for k, g in per_row.items()}
    return sums, scale @ g_user, norms


def secret_randomness() -> tuple[np.random.Generator, torch.Generator]:
    """Generators seeded from the operating system's entropy, for what the guarantee needs
    kept from the server: which rows a step sampled and the noise."""
    return (np.random.default_rng(secrets.randbits(128)),
            torch.Generator().manual_seed(secrets.randbits(63)))


def dp_epoch(model: Recommender, opt, E: torch.Tensor, rows: np.ndarray, allowed: torch.Tensor,
             q: float, noise_multiplier: float, max_grad_norm: float,
             rng: np.random.Generator, noise_generator: torch.Generator | None = None,
             user: torch.Tensor | None = None) -> tuple[float, int]:
    """One epoch of DP-SGD over a device's blocks rows [n, L + 1] at sample rate q (rows
    drawn with rng, noise from noise_generator: a device passes secret_randomness());
    user: its user-local vector [user_dim] (a leaf the optimizer steps), if any.
    Returns (q, steps) for the accountant."""
    model.train()
    n = len(rows)
    steps = max(1, round(1.0 / q))
    std = noise_multiplier * max_grad_norm
    params = dict(model.named_parameters())
    leaves = list(params.items()) + ([("user", user)] if user is not None else [])
    for _ in range(steps):
        pick = np.flatnonzero(rng.random(n) < q)
        sums = {}
        if len(pick):
            sums, sums["user"], _ = clipped_grad_sum(model, E, torch.from_numpy(rows[pick]),
                                                     allowed, max_grad_norm, user)
        for name, p in leaves:
            s = sums[name] if name in sums else torch.zeros_like(p)
            p.grad = ((s + std * torch.randn(p.shape, generator=noise_generator)) / (q * n)
                      ).reshape(p.shape)
        opt.step()
    return q, steps
