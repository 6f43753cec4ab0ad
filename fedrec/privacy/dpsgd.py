"""Differential privacy on the device (sample level); its accounting is fedrec.privacy.accounting.

Sample-level DP (privacy.mode = "sample"; unit of privacy: one interaction of a user)
-----------------------------------------------------------------------------------
DP-SGD on the device's local training of the federated parameters (and of the user-local
residual, which feeds every federated gradient and so must be trained under the same
mechanism). Rows are Poisson-sampled with rate q = train.batch-size / n (n = the device's
training interactions); each row is one positive with its sampled negatives and its
leave-one-out history pool; each row's gradient (federated parameters + user-local
residual, as one vector) is clipped to privacy.max-grad-norm C, the clipped gradients are
summed, Gaussian noise N(0, (sigma C)^2) is added and the sum is divided by the expected
batch size q n (Opacus' convention). The frozen PLM never runs (E is a constant input);
torch.func (vmap over grad) computes per-row gradients of any model, and two exact paths
avoid materialising them (per_row_method). Models whose rows share nothing (no history
pool: FedMF, TextRec with pooling "none") take a direct path: one batched forward/
backward pass to the outputs of their Linear/Embedding layers, each row's gradient norm
from Gram matrices of its 1+K candidates' inputs and output gradients (the "ghost norm":
a Linear layer's per-row gradient is sum_c outer(g_c, a_c), whose squared norm is
sum_{c,c'} <g_c, g_c'><a_c, a_c'>), and the clipped sum as one matmul per layer; no per-row gradient is materialised, and the
result equals the vmap path's (tests/test_privacy.py).

History-pooled models (pooling attention/mean) choose with privacy.pool-gradient:
- "full": each row's exact gradient, through its leave-one-out pool of the whole history
  into the item adapter and the attention. The text model's norms come in closed form
  from Gram matrices over the history (fedrec/privacy/pooled_norms.py) and the clipped sum by
  book-keeping (one matmul per layer); other history-pooled models (per-item ID vectors) use
  torch.func, whose backward pass over the history per row cost about 7x plain training;
- "none": the pool enters each row as an input, computed once per batch without gradient,
  as the guarantee already treats it (public side information, below). Rows then share
  nothing and take the direct path (the user adapter's inputs are one pool per row); the
  attention, whose only gradient is through the pool, gets neither gradient nor noise.

What the guarantee covers, honestly:
- The per-row gradient bound holds for a row's *own* term. With a history-pooled user
  tower (model.kind = "text", pooling attention/mean) the interaction x also sits in the
  pool of every other row, so removing x changes every row's gradient, and the sum's
  sensitivity is up to (2 b - 1) C for a batch of b rows, not C. The ε reported is
  therefore an interaction-level guarantee only if the history pool is treated as public
  side information; results say so ("assumes": "history pool public"). It is not a valid
  interaction-level bound otherwise (group privacy over the whole history would be).
- Clean case: a user vector that does not read the history. FedMF (model.kind = "fedmf",
  user vector = the user-local embedding trained under the same DP-SGD) and the text
  model with model.pooling = "none" (h_u = the user-local embedding alone, items still
  scored from text by the federated item adapter and bias) get the ε as stated: a row
  touches only its own positive and its negatives, which are drawn without looking at
  the history (below).
- Negatives are drawn from the whole catalog minus the row's own positive (not minus the
  history, whose contents would otherwise shape every row's negatives).
- The noise and the Poisson sampling come from the operating system's entropy
  (secret_randomness), not from the seeds a device's other randomness uses: those
  (train.seed, user, round) are known to the server, which could replay the noise.
  Simulated DP runs therefore do not repeat bit for bit. Floating-point attacks on the
  Gaussian sampler (Mironov, 2012) are not defended against.
- What a reply releases besides the DP-trained parameters must not depend on the data:
  num-examples is 1 (equal weights; the true count would change with one interaction) and
  no training loss is reported. Timing (how long the update took) is not protected.
- The accountant composes over every local step of every round the device joined: its
  history (noise_multiplier, sample_rate, steps) lives in context.state (to_state /
  from_state), so ε is cumulative. sigma is solved for the expected participation; a
  device sampled more often declines the round that would take it past the target
  (fedrec.federation.local.check_device_budget: an error reply the server drops and counts), so
  no device's ε exceeds privacy.target-epsilon.

Size: one module for the v1 models' per-row gradient paths (direct ghost norms, the
pooled path's glue, torch.func) and the DP-SGD epoch that picks among them; split, each
piece would need the others' row layout.
"""

import math
import secrets

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedrec.models.build import pool_leave_one_out
from fedrec.models.train import Histories, row_loss, row_losses
from fedrec.privacy.pooled_norms import instance_sq, pooled_clipped_sum, pooled_path_ok


class _Row(torch.nn.Module):
    """One row's loss: positive + negatives scored against the leave-one-out pool."""

    def __init__(self, model, loss: str):
        super().__init__()
        self.m, self.loss = model, loss

    def forward(self, local, E_hist, hist_idx, pos, cand_emb, cand):
        m = self.m
        pooled = None
        if m.uses_history:
            h, _, a = m.items(E_hist, hist_idx)
            keep = torch.arange(len(hist_idx)) != pos
            top = torch.nan_to_num(torch.where(keep, a, -math.inf).max().detach(), neginf=0.0)
            w = torch.exp(a - top) * keep
            pooled = ((w[:, None] * h).sum(0) / w.sum().clamp_min(1e-6))[None]
        hc, bc, _ = m.items(cand_emb, cand)
        hu = m.users(pooled, None if local is None else local[None])[0]
        return row_loss((hc @ hu + bc)[None], self.loss)


def per_row_grads(model, local, E, hist: Histories, rows: np.ndarray, negs: np.ndarray,
                  loss: str) -> tuple[dict, torch.Tensor | None]:
    """Per-row gradients {name: [b, *shape]} of the federated parameters (and [b, d] of the
    user-local vector, or None) for training rows `rows` of a one-user history.

    Dropout draws one mask per batch, shared by its rows (vmap randomness "same"), as
    plain training does when it pools a batch's history once: the history's forward pass
    then runs once for the batch instead of once per row, and only the backward pass is
    per row (simulations/bench_dp.py measures the cost). The masks never depend on the data,
    so the guarantee is unchanged."""
    wrapper = _Row(model, loss)
    params = {f"m.{k}": v.detach() for k, v in model.named_parameters()}
    pos = torch.from_numpy(rows)
    cand = torch.from_numpy(np.concatenate([hist.items.numpy()[rows, None], negs], axis=1))
    E_hist = E[hist.items]

    def f(p, loc, pos_i, cand_emb_i, cand_i):
        return functional_call(wrapper, p, (loc, E_hist, hist.items, pos_i, cand_emb_i, cand_i))

    if local is None:
        g = vmap(grad(lambda p, *a: f(p, None, *a)), in_dims=(None, 0, 0, 0),
                 randomness="same")(params, pos, E[cand], cand)
        return {k[2:]: v for k, v in g.items()}, None
    g, gl = vmap(grad(f, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0),
                 randomness="same")(params, local.detach().reshape(-1), pos, E[cand], cand)
    return {k[2:]: v for k, v in g.items()}, gl


_DIRECT_LAYERS = (torch.nn.Linear, torch.nn.Embedding)


def direct_path_ok(model, local, pool_gradient: str = "full") -> bool:
    """Whether the direct (ghost-norm) path computes this model's per-row gradients: rows
    share nothing (no history pool, or privacy.pool-gradient = "none": the pool is each
    row's input), there is a user vector to score with, and every parameter sits in a
    plain Linear or Embedding layer."""
    if model.uses_history and pool_gradient != "none":
        return False
    if not model.uses_history and local is None:
        return False
    covered = set()
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, torch.nn.Embedding):
            if (m.padding_idx is not None or m.max_norm is not None or m.scale_grad_by_freq
                    or m.sparse):
                return False
        elif not isinstance(m, torch.nn.Linear) and own:
            return False
        covered |= {id(q) for q in own}
    return all(id(q) in covered for q in model.parameters())


def no_gradient(model, pool_gradient: str) -> set[str]:
    """Federated parameters whose DP-SGD gradient is zero by construction: the attention
    when the pool is a row input (privacy.pool-gradient = "none"). They get neither
    gradient nor noise: an update that is zero whatever the data reveals nothing."""
    if model.uses_history and pool_gradient == "none" and model.attention is not None:
        return {f"attention.{n}" for n, _ in model.attention.named_parameters()}
    return set()


def _row_pools(model, E, hist: Histories, rows: np.ndarray) -> torch.Tensor:
    """Each row's leave-one-out history pool [b, d], as a constant input (no gradient)."""
    with torch.no_grad():
        h, _, a = model.items(E[hist.items], hist.items)
        return pool_leave_one_out(h, a, torch.from_numpy(rows))


def _direct_clipped_sum(model, local, E, hist: Histories, rows: np.ndarray, negs: np.ndarray,
                        loss: str, max_grad_norm: float):
    """direct_path_ok models: ({name: sum of clipped per-row gradients}, that sum for the
    user-local vector [d] (or None), per-row norms [b]) without materialising per-row
    gradients. A layer sees one input per candidate (item side: b x c rows) or one per row
    (user side, on the row's pool); either way a row's gradient of it is
    sum_j outer(g_j, a_j) over that row's inputs j."""
    b = len(rows)
    cand = torch.from_numpy(np.concatenate([hist.items.numpy()[rows, None], negs], axis=1))
    c = cand.shape[1]
    flat = cand.reshape(-1)
    pooled = _row_pools(model, E, hist, rows) if model.uses_history else None
    taps: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    twice: list[torch.nn.Module] = []

    def tap(mod, inp, out):
        if mod in taps:
            twice.append(mod)
        taps[mod] = (inp[0].detach(), out)

    layers = {m: n for n, m in model.named_modules() if isinstance(m, _DIRECT_LAYERS)}
    loc = None if local is None else local.detach().reshape(1, -1).repeat(b, 1).requires_grad_()
    handles = [m.register_forward_hook(tap) for m in layers]
    try:
        h, bias, _ = model.items(E[flat], flat)
        hu = model.users(pooled, loc)
    finally:
        for handle in handles:
            handle.remove()
    if twice:
        raise RuntimeError(f"direct per-row gradients: layer {layers[twice[0]]} ran twice")
    odd = [m for m, (a, _) in taps.items() if a.shape[0] not in (b, b * c) or a.dim() > 2]
    if odd:  # one input row per candidate (model.items: E rows, item ids) or per row
        raise RuntimeError(f"direct per-row gradients: layer {layers[odd[0]]} got input "
                           f"of shape {tuple(taps[odd[0]][0].shape)}")
    scores = torch.einsum("bd,bcd->bc", hu, h.view(b, c, -1)) + bias.view(b, c)
    mods = list(taps)
    extra = [] if loc is None else [loc]
    grads = torch.autograd.grad(row_losses(scores, loss).sum(),
                                [taps[m][1] for m in mods] + extra, allow_unused=True)
    g_local = grads[len(mods)] if loc is not None else None  # [b, d]: one copy per row
    sq = torch.zeros(b) if g_local is None else g_local.pow(2).sum(1)
    parts = []  # (module, input [b, r, ...], output grad [b, r, out]), r = c or 1
    for m, g in zip(mods, grads[:len(mods)]):
        if g is None:
            continue
        a = taps[m][0]
        r = a.shape[0] // b
        g = g.reshape(b, r, -1)
        if isinstance(m, torch.nn.Embedding):
            a = a.reshape(b, r)
            same = (a[:, :, None] == a[:, None, :]).to(g.dtype)
            sq = sq + (same * (g @ g.transpose(1, 2))).sum((1, 2))
        else:
            a = a.reshape(b, r, -1)
            sq = sq + instance_sq(a, g)
            if m.bias is not None:
                sq = sq + g.sum(1).pow(2).sum(1)
        parts.append((m, a, g))
    norms = sq.clamp_min(0).sqrt()
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = {n: torch.zeros_like(q) for n, q in model.named_parameters()}
    for m, a, g in parts:
        r = a.shape[1]
        gs = (g * scale[:, None, None]).reshape(b * r, -1)
        name = layers[m]
        prefix = f"{name}." if name else ""
        if isinstance(m, torch.nn.Embedding):
            sums[prefix + "weight"] = sums[prefix + "weight"].index_add(0, a.reshape(-1), gs)
        else:
            sums[prefix + "weight"] = gs.T @ a.reshape(b * r, -1)
            if m.bias is not None:
                sums[prefix + "bias"] = gs.sum(0)
    return sums, (None if g_local is None else scale @ g_local), norms


def _vmap_clipped_sum(model, local, E, hist: Histories, rows: np.ndarray, negs: np.ndarray,
                      loss: str, max_grad_norm: float):
    """Any model: per-row gradients from torch.func, clipped and summed."""
    g, gl = per_row_grads(model, local, E, hist, rows, negs, loss)
    flat = [v.reshape(len(rows), -1) for v in g.values()]
    if gl is not None:
        flat.append(gl.reshape(len(rows), -1))
    # per-tensor norms, then the norm of those: no copy of all per-row gradients
    norms = torch.stack([v.norm(dim=1) for v in flat], dim=1).norm(dim=1)
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = {name: (scale @ v.reshape(len(rows), -1)).view(v.shape[1:]) for name, v in g.items()}
    return sums, (None if gl is None else scale @ gl), norms


def clipped_grad_sum(model, local, E, hist: Histories, rows: np.ndarray, negs: np.ndarray,
                     loss: str, max_grad_norm: float, method: str = "auto",
                     pool_gradient: str = "full", cache: dict | None = None):
    """Sum over rows of each row's gradient clipped to max_grad_norm (federated parameters
    and user-local vector as one vector): ({name: tensor}, local sum [d] or None, per-row
    norms [b]). method "direct" (ghost norms, direct_path_ok models), "pooled" (ghost
    norms through the history pool, pooled_path_ok models), "vmap" (torch.func) or "auto"
    (per_row_method). pool_gradient "none": a history-pooled model's pool is each row's
    input (direct path only). cache: see pooled_clipped_sum."""
    if method == "auto":
        method = per_row_method(model, local, pool_gradient)
    if method == "direct":
        return _direct_clipped_sum(model, local, E, hist, rows, negs, loss, max_grad_norm)
    if model.uses_history and pool_gradient == "none":
        raise ValueError("privacy.pool-gradient = 'none' runs on the direct path only")
    if method == "pooled":
        return pooled_clipped_sum(model, local, E, hist, rows, negs, loss, max_grad_norm,
                                  cache)
    return _vmap_clipped_sum(model, local, E, hist, rows, negs, loss, max_grad_norm)


def per_row_method(model, local, pool_gradient: str = "full") -> str:
    """The cheapest exact way to this model's clipped per-row gradients: "direct" (rows
    share nothing), "pooled" (the text model through its history pool) or "vmap"."""
    if direct_path_ok(model, local, pool_gradient):
        return "direct"
    return "pooled" if pooled_path_ok(model) and pool_gradient == "full" else "vmap"


def secret_randomness() -> tuple[np.random.Generator, torch.Generator]:
    """Generators seeded from the operating system's entropy, for what the guarantee needs
    kept from the server: which rows a step sampled and the noise. A device's other seeds
    (train.seed, its user index, the round) are known to the server, which could otherwise
    replay the noise and subtract it."""
    return (np.random.default_rng(secrets.randbits(128)),
            torch.Generator().manual_seed(secrets.randbits(63)))


def dp_train_epoch(model, local, opt, E, hist: Histories, cfg, rng: np.random.Generator,
                   negatives, noise_multiplier: float, max_grad_norm: float,
                   noise_generator: torch.Generator | None = None,
                   cache: dict | None = None) -> tuple[float, int]:
    """One epoch of DP-SGD with Poisson sampling (rng) over a one-user history, Gaussian
    noise from noise_generator (None: torch's global generator; a device passes
    secret_randomness()). cache: kept across a device's epochs over the same history
    (pooled_clipped_sum). Returns (sample_rate, steps) for the accountant."""
    model.train()
    n = len(hist.items)
    q = min(1.0, cfg.train.batch_size / max(n, 1))
    steps = max(1, round(1.0 / q))
    negs = negatives(n)
    pool_gradient = cfg.privacy.pool_gradient
    skip = no_gradient(model, pool_gradient)
    params = {k: p for k, p in model.named_parameters() if k not in skip}
    method = per_row_method(model, local, pool_gradient)
    std = noise_multiplier * max_grad_norm
    cache = {} if cache is None else cache
    for _ in range(steps):
        rows = np.flatnonzero(rng.random(n) < q)
        if len(rows):
            sums, sum_local, _ = clipped_grad_sum(model, local, E, hist, rows, negs[rows],
                                                  cfg.train.loss, max_grad_norm, method,
                                                  pool_gradient, cache)
        for name, p in params.items():
            s = sums[name] if len(rows) else 0 * p
            p.grad = (s + std * torch.randn(p.shape, generator=noise_generator)) / (q * n)
        if local is not None:
            s = sum_local if len(rows) else torch.zeros(local.numel())
            noise = std * torch.randn(local.numel(), generator=noise_generator)
            local.grad = ((s + noise) / (q * n)).reshape(local.shape)
        opt.step()
    return q, steps
