"""The server's step, shared by both aggregation paths (strategy.py; secagg.py, whose
server sees only the mean): the FedAdam step with its lr schedule and per-array lr, and
the server side of user-level DP (DP-FedAvg).

FedAdam (Reddi et al., 2021; Flower's FedAdam arithmetic): with the mean update
delta_t = mean of the devices' parameters - the global ones,
m_t = b1 m + (1 - b1) delta_t, v_t = b2 v + (1 - b2) delta_t^2 and
x_{t+1} = x_t + s_a eta_t sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m_t / (sqrt(v_t) + tau),
eta_t following fed.server-lr, -warmup and -decay, and s_a = fed.server-lr-ids for the
model's per-item ID tables (1 elsewhere): Adam's moments do not depend on the lr, so that
is Adam with a per-array lr.

User-level DP (privacy.mode = "user"; unit of privacy: one user's whole history). Each
device clips its update to L2 norm C (Flower's fixedclipping_mod or
adaptiveclipping_mod, given C in the train config); the server sums the n clipped
updates that arrived, divides by the k devices it sampled (a fixed denominator, so one
user moves the mean by at most C / k whatever arrives) and adds N(0, (sigma C / k)^2) to
every coordinate, before the server optimizer sees it: Adam's moments only post-process
noised means. Adaptive clipping (Andrew et al., NeurIPS 2021): devices also report
whether they clipped; the server releases the clipped count with noise N(0, s_b^2),
s_b = k / 20, and moves C <- C exp(lr (clipped fraction - target)); the update's noise
multiplier becomes (sigma^-2 - (2 s_b)^-2)^(-1/2), so the two releases together spend what
sigma alone would (Flower's arithmetic). Accounting: fedrec.privacy.accounting.

Correlated noise (privacy.noise = "tree": DP-FTRL's tree aggregation, Kairouz et al.,
ICML 2021): the server releases noisy prefix sums of the clipped sums. Every complete
dyadic block of rounds (1, 2, 4, ... rounds) draws one N(0, (sigma C)^2) per coordinate,
and the prefix sum after round t carries the draws of the blocks of t's binary
decomposition (at most log2 t + 1 of them); the round's noised mean update is the
difference of two consecutive noisy prefix sums over k. Summed over rounds, as a linear
server step sums them, the model carries a prefix's noise, not t rounds of fresh noise.
Accounting: fedrec.privacy.exact.tree_epsilon (no amplification by sampling; each
device joins at most once every floor(N / k) rounds under fed.sampling = "balanced").
"""

import math

import numpy as np

from fedrec.config import Config
from fedrec.errors import FedrecError
from fedrec.models.build import id_tables

BETA_1, BETA_2 = 0.9, 0.99  # Flower FedAdam's defaults


def server_lr(cfg: Config, rnd: int) -> float:
    """FedAdam's eta for round rnd (1-based, the run's global count): fed.server-lr,
    reached linearly over fed.server-lr-warmup rounds (round w of W takes w / W of it),
    then constant or (fed.server-lr-decay = "cosine") falling along a half cosine to 0
    after round fed.num-rounds."""
    f = cfg.fed
    if rnd <= f.server_lr_warmup:
        return f.server_lr * rnd / f.server_lr_warmup
    if f.server_lr_decay == "cosine":
        done = (rnd - 1 - f.server_lr_warmup) / (f.num_rounds - f.server_lr_warmup)
        return float(f.server_lr * 0.5 * (1.0 + np.cos(np.pi * done)))
    return f.server_lr


class ServerAdam:
    """FedAdam's moments and step over named arrays (fed.strategy = "fedadam")."""

    def __init__(self, cfg: Config, moments: dict | None = None):
        self.cfg = cfg
        self.ids = id_tables(cfg)
        self.m_t = dict((moments or {}).get("m_t", {}))
        self.v_t = dict((moments or {}).get("v_t", {}))

    def step(self, rnd: int, sent: dict[str, np.ndarray], delta: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """The global arrays after round rnd's step on the mean update delta (each in the
        dtype it was sent in)."""
        eta = server_lr(self.cfg, rnd)
        norm = eta * math.sqrt(1 - BETA_2 ** (rnd + 1.0)) / (1 - BETA_1 ** (rnd + 1.0))
        out = {}
        for k, d in delta.items():
            self.m_t[k] = BETA_1 * self.m_t.get(k, 0.0) + (1 - BETA_1) * d
            self.v_t[k] = BETA_2 * self.v_t.get(k, 0.0) + (1 - BETA_2) * d * d
            scale = self.cfg.fed.server_lr_ids if k.startswith(self.ids) else 1.0
            out[k] = (sent[k] + scale * norm * self.m_t[k] / (np.sqrt(self.v_t[k])
                                                              + self.cfg.fed.server_tau)
                      ).astype(sent[k].dtype)
        return out

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return {"m_t": self.m_t, "v_t": self.v_t}


class UserDP:
    """The server side of DP-FedAvg for k sampled devices a round (see the module)."""

    def __init__(self, cfg: Config, k: int, population: int):
        p = cfg.privacy
        if cfg.fed.strategy not in ("fedavg", "fedprox", "fedadam"):
            raise FedrecError("config: privacy.mode = 'user' needs fed.strategy fedavg, fedprox "
                              "or fedadam (the noise is calibrated to a mean); got "
                              f"{cfg.fed.strategy!r}")
        if p.delta >= 1.0 / population:
            raise FedrecError(f"config: 'privacy.delta' must be below 1/{population} users for "
                              f"user-level DP; got {p.delta:g}")
        self.k, self.clip = k, p.max_grad_norm
        self.adaptive = p.clipping == "adaptive"
        self.lr, self.quantile = p.clip_norm_lr, p.clipped_quantile
        self.sigma, self.count_std = p.noise_multiplier, 0.0
        if self.adaptive and p.noise_multiplier > 0:
            self.count_std = k / 20
            if p.noise_multiplier >= 2 * self.count_std:
                raise FedrecError(
                    f"config: privacy.clipping = 'adaptive' with {k} devices a round cannot "
                    f"reach privacy.noise-multiplier {p.noise_multiplier:g} (the clipped count "
                    f"takes noise of std {self.count_std:g}); sample at least "
                    f"{math.floor(10 * p.noise_multiplier) + 1} devices or use fixed clipping")
            self.sigma = (p.noise_multiplier ** -2 - (2 * self.count_std) ** -2) ** -0.5
        self.rng = np.random.default_rng()  # the noise: never from a seed the server logs
        self.tree = TreeNoise(self.rng) if p.noise == "tree" else None

    def noised(self, delta: dict[str, np.ndarray], n: int, clipped: int | None = None,
               rnd: int = 0) -> dict[str, np.ndarray]:
        """The private mean update of round rnd from the mean delta of the n clipped
        updates that arrived, and, with adaptive clipping, how many devices clipped (moves
        C for the next round)."""
        std = self.sigma * self.clip / self.k
        noise = (self.tree.noise(rnd, {k: np.shape(d) for k, d in delta.items()}, std)
                 if self.tree else {k: self.rng.normal(0.0, std, np.shape(d)) for k, d in delta.items()})
        out = {k: np.asarray(d, np.float64) * (n / self.k) + noise[k] for k, d in delta.items()}
        if self.adaptive and clipped is not None:
            noisy = (clipped + self.rng.normal(0.0, self.count_std)) / n
            self.clip *= math.exp(self.lr * (noisy - self.quantile))
        return out


class TreeNoise:
    """The tree's node draws (see the module): noise(t) = prefix(t) - prefix(t - 1)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes = rng, {}
        self.previous: tuple[int, dict] = (0, {})  # the last round's prefix (round 0: none)

    @staticmethod
    def blocks(t: int) -> list[tuple[int, int]]:
        """(first round, size) of the dyadic blocks that make up rounds 1..t."""
        out, start = [], 1
        for bit in reversed(range(t.bit_length())):
            if t >> bit & 1:
                out.append((start, 1 << bit))
                start += 1 << bit
        return out

    def prefix(self, t: int, shapes: dict, std: float) -> dict[str, np.ndarray]:
        total = {k: np.zeros(s) for k, s in shapes.items()}
        for node in self.blocks(t):
            if node not in self.nodes:
                self.nodes[node] = {k: self.rng.normal(0.0, std, s) for k, s in shapes.items()}
            for k in total:
                total[k] += self.nodes[node][k]
        return total

    def noise(self, t: int, shapes: dict, std: float) -> dict[str, np.ndarray]:
        if t < 1:
            raise ValueError("tree noise needs the round (1-based)")
        last, before = self.previous
        before = before if last == t - 1 else self.prefix(t - 1, shapes, std)
        now = self.prefix(t, shapes, std)
        keep = set(self.blocks(t))  # later prefixes reuse only these
        self.nodes = {k: v for k, v in self.nodes.items() if k in keep}
        self.previous = (t, now)
        return {k: now[k] - before.get(k, 0.0) for k in now}
