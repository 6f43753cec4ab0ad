"""Differential privacy on the device (sample level) and its cumulative accounting.

Sample-level DP (privacy.mode = "sample"; unit of privacy: one interaction of a user)
-----------------------------------------------------------------------------------
DP-SGD on the device's local training of the federated parameters (and of the user-local
residual, which feeds every federated gradient and so must be trained under the same
mechanism). Rows are Poisson-sampled with rate q = train.batch-size / n (n = the device's
training interactions); each row is one positive with its sampled negatives and its
leave-one-out history pool; each row's gradient (federated parameters + user-local
residual, as one vector) is clipped to privacy.max-grad-norm C, the clipped gradients are
summed, Gaussian noise N(0, (sigma C)^2) is added and the sum is divided by the expected
batch size q n (Opacus' convention). Per-row gradients come from torch.func (vmap over
grad) on the small model; the frozen PLM never runs (E is a constant input).

What the guarantee covers, honestly:
- The per-row gradient bound holds for a row's *own* term. With a history-pooled user
  tower (model.kind = "text", pooling attention/mean) the interaction x also sits in the
  pool of every other row, so removing x changes every row's gradient, and the sum's
  sensitivity is up to (2 b - 1) C for a batch of b rows, not C. The ε reported is
  therefore an interaction-level guarantee only if the history pool is treated as public
  side information; results say so ("assumes": "history pool public"). It is not a valid
  interaction-level bound otherwise (group privacy over the whole history would be).
- Clean case: a user vector that does not read the history. FedMF (model.kind = "fedmf",
  user vector = the user-local embedding trained under the same DP-SGD) gets the ε as
  stated; for the text model the clean option is to replace the pool with the user-local
  embedding when DP is on (not built yet; see the issue).
- Negatives are drawn from the whole catalog minus the row's own positive (not minus the
  history, whose contents would otherwise shape every row's negatives).
- What a reply releases besides the DP-trained parameters must not depend on the data:
  num-examples is 1 (equal weights; the true count would change with one interaction) and
  no training loss is reported. Timing (how long the update took) is not protected.
- The accountant composes over every local step of every round the device joined: its
  history (noise_multiplier, sample_rate, steps) lives in context.state (to_state /
  from_state), so ε is cumulative. A device sampled more often than the expected
  participation used to solve sigma for a target ε ends above that target; its reported ε
  is the true cumulative one.
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedrec.train import Histories, row_loss

UNIT = {"sample": "interaction", "user": "user"}
ACCOUNTANTS = ("rdp", "prv", "gdp")


def describe(cfg) -> dict:
    """What every stored ε must name: unit, accountant, delta (and any assumption)."""
    p = cfg.privacy
    out = {"mode": p.mode, "unit": UNIT.get(p.mode, "none"), "accountant": p.accountant,
           "delta": p.delta}
    if p.mode == "sample" and cfg.model.kind == "text":
        out["assumes"] = "history pool public"
    return out


def label(cfg) -> str:
    d = describe(cfg)
    extra = f", {d['assumes']}" if "assumes" in d else ""
    return f"ε ({d['unit']}{extra}; {d['accountant']}, δ={d['delta']:g})"


def _opacus_accountant(name: str):
    import warnings

    from opacus.accountants import create_accountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gdp: "experimental" (said in the docs)
        return create_accountant(name)


@dataclass
class Accountant:
    """Composition history [(noise_multiplier, sample_rate, steps)] of one device or run,
    evaluated with an Opacus accountant. Persist it with to_state / from_state."""

    name: str
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        if any(s == 0 for s, _, _ in self.history):
            return math.inf  # a noiseless step: no guarantee
        if self.name == "rdp":  # Opacus' RDPAccountant.get_epsilon, per-step RDP cached
            from opacus.accountants.analysis.rdp import get_privacy_spent

            rdp = sum([_rdp_per_step(q, s) * n for s, q, n in self.history])
            return float(get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)[0])
        acc = _opacus_accountant(self.name)
        acc.history = list(self.history)
        return float(acc.get_epsilon(delta=delta))

    def to_state(self) -> dict:
        """Plain lists for a Flower ConfigRecord (context.state)."""
        return {"accountant": self.name,
                "noise-multiplier": [float(s) for s, _, _ in self.history],
                "sample-rate": [float(q) for _, q, _ in self.history],
                "steps": [int(n) for _, _, n in self.history]}

    @classmethod
    def from_state(cls, state, name: str) -> "Accountant":
        if state is None:
            return cls(name)
        if state["accountant"] != name:
            raise ValueError(f"stored accountant {state['accountant']!r} differs from "
                             f"privacy.accountant {name!r}; ε cannot be continued")
        return cls(name, [(float(s), float(q), int(n)) for s, q, n in
                          zip(state["noise-multiplier"], state["sample-rate"], state["steps"])])


_RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' alphas


@lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one sampled Gaussian step at every order. Opacus recomputes it (~0.1 s, a
    series per fractional order) on every get_epsilon; a device's (q, sigma) rarely
    changes, and RDP composes by multiplying by the step count."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                       orders=_RDP_ORDERS)


@lru_cache(maxsize=256)
def solve_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float,
                           steps: int, accountant: str) -> float:
    """Smallest sigma with ε(sigma) <= target_epsilon after `steps` steps at `sample_rate`."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.005))


def local_plan(cfg, n: int, participation: float) -> tuple[float, int, int]:
    """(sample_rate, steps per round, expected rounds joined) of a device with n rows."""
    q = min(1.0, cfg.train.batch_size / max(n, 1))
    per_round = cfg.train.local_epochs * max(1, round(1.0 / q))
    rounds = max(1, math.ceil(cfg.fed.num_rounds * participation - 1e-9))
    return q, per_round, rounds


def noise_multiplier(cfg, n: int, participation: float) -> float:
    """privacy.noise-multiplier, or the one solved for privacy.target-epsilon over the
    planned rounds at the expected participation (clients-per-round / population)."""
    p = cfg.privacy
    if p.target_epsilon <= 0:
        return p.noise_multiplier
    q, per_round, rounds = local_plan(cfg, n, participation)
    return solve_noise_multiplier(target_epsilon=p.target_epsilon, delta=p.delta,
                                  sample_rate=q, steps=per_round * rounds,
                                  accountant=p.accountant)


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
    user-local vector, or None) for training rows `rows` of a one-user history."""
    wrapper = _Row(model, loss)
    params = {f"m.{k}": v.detach() for k, v in model.named_parameters()}
    pos = torch.from_numpy(rows)
    cand = torch.from_numpy(np.concatenate([hist.items.numpy()[rows, None], negs], axis=1))
    E_hist = E[hist.items]

    def f(p, loc, pos_i, cand_emb_i, cand_i):
        return functional_call(wrapper, p, (loc, E_hist, hist.items, pos_i, cand_emb_i, cand_i))

    if local is None:
        g = vmap(grad(lambda p, *a: f(p, None, *a)), in_dims=(None, 0, 0, 0),
                 randomness="different")(params, pos, E[cand], cand)
        return {k[2:]: v for k, v in g.items()}, None
    g, gl = vmap(grad(f, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0),
                 randomness="different")(params, local.detach().reshape(-1), pos, E[cand], cand)
    return {k[2:]: v for k, v in g.items()}, gl


def dp_train_epoch(model, local, opt, E, hist: Histories, cfg, rng: np.random.Generator,
                   negatives, noise_multiplier: float, max_grad_norm: float) -> tuple[float, int]:
    """One epoch of DP-SGD with Poisson sampling over a one-user history.
    Returns (sample_rate, steps) for the accountant."""
    model.train()
    n = len(hist.items)
    q = min(1.0, cfg.train.batch_size / max(n, 1))
    steps = max(1, round(1.0 / q))
    negs = negatives(n)
    params = dict(model.named_parameters())
    for _ in range(steps):
        rows = np.flatnonzero(rng.random(n) < q)
        if len(rows):
            g, gl = per_row_grads(model, local, E, hist, rows, negs[rows], cfg.train.loss)
            flat = [v.reshape(len(rows), -1) for v in g.values()]
            if gl is not None:
                flat.append(gl.reshape(len(rows), -1))
            # per-tensor norms, then the norm of those: no copy of all per-row gradients
            norms = torch.stack([v.norm(dim=1) for v in flat], dim=1).norm(dim=1)
            scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, p in params.items():
            s = (scale @ g[name].reshape(len(rows), -1)).view_as(p) if len(rows) else 0 * p
            noise = torch.randn_like(p) * noise_multiplier * max_grad_norm
            p.grad = (s + noise) / (q * n)
        if local is not None:
            s = scale @ gl if len(rows) else torch.zeros(local.numel())
            noise = torch.randn(local.numel()) * noise_multiplier * max_grad_norm
            local.grad = ((s + noise) / (q * n)).reshape(local.shape)
        opt.step()
    return q, steps
