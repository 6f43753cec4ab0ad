"""Privacy accounting: what every ε names (unit, accountant, δ), the cumulative
accountant of a device or a run (RDP, PRV or GDP; Opacus', with the RDP of the
Poisson-subsampled Gaussian written out here and cached per step), ε parsing, and the
noise multiplier solved for a target ε over a device's planned rounds.
tests/test_accountants.py checks every accountant against Google's dp-accounting (RDP,
PLD) or the closed form (GDP) within 1%.
"""

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import special

from fedrec.errors import FedrecError
from fedrec.models.profile import read_release
from fedrec.models.train import windows_per_step
from fedrec.privacy.exact import tree_epsilon, tree_separation

UNIT = {"sample": "block", "user": "user"}
# OPACUS: its accountants are imported where ε is computed: opacus takes ~1.4 s to import
# beyond torch (measured on 2 cores), and a device's process in a non-private run needs none.
EPSILON_METRIC = "epsilon"  # a device's cumulative sample-level ε in every train reply
ACCOUNTANTS = ("rdp", "prv", "gdp")


def describe(cfg) -> dict:
    """What every stored ε must name: unit, accountant, delta (and any assumption)."""
    p = cfg.privacy
    out = {"mode": p.mode, "unit": UNIT.get(p.mode, "none"), "accountant": p.accountant,
           "delta": p.delta}
    if p.mode == "user" and p.noise == "tree":
        out["accountant"] = "tree (exact Gaussian, one join per separation)"
    if p.mode == "user" and cfg.model.kind == "profile":
        out["accountant"] += " (model.prior's release composed)"
    if p.mode == "sample":  # fedrec/privacy/dpsgd.py
        out["unit"] = f"block of up to {cfg.model.max_len + 1} consecutive interactions"
    return out


def label(cfg) -> str:
    d = describe(cfg)
    return f"ε ({d['unit']}; {d['accountant']}, δ={d['delta']:g})"


def parse_epsilons(text: str) -> list[float]:
    """--epsilons "inf,8,4" -> [inf, 8.0, 4.0] (inf or ∞ = no DP); each ε > 0."""
    out = []
    for part in (t.strip().lower() for t in text.split(",")):
        if not part:
            continue
        try:
            eps = math.inf if part in ("inf", "∞") else float(part)
        except ValueError:
            raise FedrecError(f"--epsilons: '{part}' is not a number or inf "
                              "(e.g. --epsilons inf,8)") from None
        if not eps > 0:
            raise FedrecError(f"--epsilons: each ε must be > 0 or inf, got '{part}'")
        out.append(eps)
    if not out:
        raise FedrecError("--epsilons: give at least one value, e.g. --epsilons inf,8")
    return out


def _opacus_accountant(name: str):
    from opacus.accountants import create_accountant  # lazy: OPACUS

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
            from opacus.accountants.analysis.rdp import get_privacy_spent  # lazy: OPACUS

            rdp = sum([_rdp_per_step(q, s) * n for s, q, n in self.history])
            return float(get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)[0])
        acc = _opacus_accountant(self.name)
        acc.history = list(self.history)
        if self.name != "prv":
            return float(acc.get_epsilon(delta=delta))
        # PRV's error bound is absolute (Opacus' default 0.01): 1.5% at ε = 0.7. Below
        # ε = 2 refine it to 0.5% of ε (tests/test_accountants.py checks 1% against PLD).
        eps = float(acc.get_epsilon(delta=delta, eps_error=0.01))
        if eps < 2.0:
            eps = float(acc.get_epsilon(delta=delta, eps_error=max(eps / 200, 1e-4)))
        return eps

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
    """RDP of one sampled Gaussian step at every order: Opacus' compute_rdp (steps=1,
    orders _RDP_ORDERS), vectorised over orders and series terms. Opacus sums its series
    term by term in Python (~30-80 ms per (q, sigma), more than a whole DP-SGD client
    update of a small model, and a deployed device computes it once per round); the
    same terms and stopping rule in numpy give the same values to ~1e-12 (tested). A
    device's (q, sigma) rarely changes, and RDP composes by multiplying by the steps."""
    return _sampled_gaussian_rdp(float(sample_rate), float(noise_multiplier),
                                 np.asarray(_RDP_ORDERS, dtype=float))


def _log_signed_sum(log_terms: np.ndarray, positive: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(±exp(log_terms))) along axis (terms of -inf add nothing)."""
    top = np.max(log_terms, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.sum(np.where(positive, 1.0, -1.0) * np.exp(log_terms - top), axis=axis)
    with np.errstate(divide="ignore"):
        return np.log(total) + np.squeeze(top, axis)


def _sampled_gaussian_rdp(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Opacus' _compute_rdp(q, sigma, alpha) for every alpha in orders (Mironov et al.,
    "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3)."""
    if q == 0:
        return np.zeros_like(orders)
    if sigma == 0:
        return np.full_like(orders, np.inf)
    if q == 1.0:
        return orders / (2 * sigma**2)
    out = np.empty_like(orders)
    is_int = np.array([float(a).is_integer() for a in orders])
    log_q, log_1q = math.log(q), math.log(1 - q)
    if is_int.any():  # sum_{i=0..alpha} binom(alpha, i) q^i (1-q)^(alpha-i) e^{(i^2-i)/2s^2}
        a = orders[is_int][:, None]
        i = np.arange(int(a.max()) + 1)[None, :]
        with np.errstate(divide="ignore"):
            s = (np.log(special.binom(a, i)) + i * log_q + (a - i) * log_1q
                 + (i * i - i) / (2 * sigma**2))
        s = np.where(i <= a, s, -np.inf)
        out[is_int] = _log_signed_sum(s, np.ones_like(s, bool)) / (a[:, 0] - 1)
    if (~is_int).any():  # the two-sided series, terms until both are below e^-30
        alphas = orders[~is_int]
        z0 = sigma**2 * math.log(1 / q - 1) + 0.5
        log_a0, log_a1 = np.full(len(alphas), -np.inf), np.full(len(alphas), -np.inf)
        done = np.zeros(len(alphas), bool)
        start, chunk = 0, 16
        while not done.all():  # chunks of growing size, for the orders still summing
            act = np.flatnonzero(~done)
            a = alphas[act][:, None]
            i = np.arange(start, start + chunk, dtype=float)[None, :]
            coef = special.binom(a, i)
            log_coef = np.log(np.abs(coef))
            j = a - i
            log_e0 = special.log_ndtr((z0 - i) / sigma)  # Opacus: log(erfc(x / sqrt 2) / 2)
            log_e1 = special.log_ndtr((j - z0) / sigma)
            t0 = log_coef + i * log_q + j * log_1q + (i * i - i) / (2 * sigma**2) + log_e0
            t1 = log_coef + j * log_q + i * log_1q + (j * j - j) / (2 * sigma**2) + log_e1
            stop = np.maximum(t0, t1) < -30  # Opacus stops after the first such term
            ends = stop.any(1)
            keep = ~ends[:, None] | (np.arange(chunk)[None, :] <= stop.argmax(1)[:, None])
            plus = np.concatenate([np.ones((len(act), 1), bool), coef > 0], 1)
            for acc, t in ((log_a0, t0), (log_a1, t1)):
                terms = np.concatenate([acc[act, None], np.where(keep, t, -np.inf)], 1)
                acc[act] = _log_signed_sum(terms, plus)
            done[act[ends]] = True
            start, chunk = start + chunk, 2 * chunk
        out[~is_int] = np.logaddexp(log_a0, log_a1) / (alphas - 1)
    return out


@lru_cache(maxsize=256)
def solve_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float,
                           steps: int, accountant: str) -> float:
    """Smallest sigma with ε(sigma) <= target_epsilon after `steps` steps at `sample_rate`."""
    from opacus.accountants.utils import get_noise_multiplier  # lazy: OPACUS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.005))


def local_plan(cfg, n: int, participation: float) -> tuple[float, int, int]:
    """(sample_rate, steps per round, expected rounds joined) of a device with n rows
    (blocks: fedrec/privacy/dpsgd.py)."""
    per_step = windows_per_step(cfg.train.batch_size, cfg.model.max_len)
    q = min(1.0, per_step / max(n, 1))
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


def user_epsilon(cfg, rounds: int, sample_rate: float) -> float:
    """User-level ε after `rounds` rounds of DP-FedAvg at `sample_rate` (k / population)
    with privacy.noise-multiplier: Poisson subsampling at q = k / N is the usual
    approximation of Flower's fixed-size sample without replacement, not an exact bound.
    privacy.noise = "tree": the tree's exact ε (no amplification by sampling; each device
    joins at most once every tree_separation rounds).
    model.kind = "profile": its release (one Gaussian step at sample rate 1) composed first.
    """
    if cfg.privacy.noise == "tree":
        return tree_epsilon(cfg.privacy.noise_multiplier, rounds,
                            tree_separation(sample_rate), cfg.privacy.delta)
    acc = Accountant(cfg.privacy.accountant)
    if cfg.model.kind == "profile":
        acc.step(release_sigma(cfg), 1.0, 1)
    acc.step(cfg.privacy.noise_multiplier, sample_rate, rounds)
    return acc.epsilon(cfg.privacy.delta)


def release_sigma(cfg) -> float:
    """The noise multiplier of a profile model's user-level release (model.prior)."""
    rel = read_release(cfg.model.prior)
    if rel["unit"] != "user" or rel["delta"] > cfg.privacy.delta:
        raise FedrecError(f"config: 'model.prior' = '{cfg.model.prior}' is a {rel['unit']} "
                          f"release at δ {rel['delta']:g}; a user-level run at δ "
                          f"{cfg.privacy.delta:g} composes a user-level release at that δ or below")
    return rel["noise-multiplier"]


def budget_stop(cfg, rnd: int, sample_rate: float) -> str:
    """Why round `rnd` must not run (its user-level ε would exceed privacy.target-epsilon),
    or "" when it may; both server paths ask it before each round."""
    p = cfg.privacy
    if p.mode != "user" or p.target_epsilon <= 0:
        return ""
    eps = user_epsilon(cfg, rnd, sample_rate)
    if eps <= p.target_epsilon:
        return ""
    spent = user_epsilon(cfg, rnd - 1, sample_rate) if rnd > 1 else 0.0
    return (f"privacy budget exhausted: round {rnd} would bring {label(cfg)} to {eps:.3f} > "
            f"privacy.target-epsilon {p.target_epsilon:g} (spent after round {rnd - 1}: "
            f"{spent:.3f}); stopped before it")
