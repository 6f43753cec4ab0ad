"""User-level DP (privacy.mode = "user"; unit of privacy: one user's whole history).

DP-FedAvg with Flower's DifferentialPrivacyClientSideFixedClipping: each device clips its
update (reply - received) to privacy.max-grad-norm C with fixedclipping_mod (attached to
the train handler only, see clients/app.py), the server averages the k sampled updates
with equal weights (devices report num-examples = 1) and adds N(0, (sigma C / k)^2).

Accounting: Opacus' accountant (privacy.accountant) over `round` compositions of the
subsampled Gaussian mechanism with sample rate q = k / population. Flower samples exactly
k devices without replacement; the Poisson-sampling analysis at q = k / N is the usual
approximation of that, not an exact bound for fixed-size sampling. Before each round the
server checks the ε that round would bring; if it exceeds privacy.target-epsilon (> 0),
training stops before that round (BudgetExhausted) and the run ends with the last model.
What devices release besides the clipped update (num-examples = 1, no loss) does not
depend on their data. Works with fedavg, fedprox and fedadam (the noise is calibrated to a
mean): with fedadam the noise goes on the mean update BEFORE the server's Adam step
(fedrec/federation/strategy.py), so the Adam moments only post-process noised means; Flower's
wrapper, which would noise the model after that step, then adds none.
"""

import math

from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
)
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from fedrec.errors import FedrecError
from fedrec.privacy.accounting import Accountant, label


class BudgetExhausted(FedrecError):
    """Raised before a round that would exceed privacy.target-epsilon; holds the model."""

    def __init__(self, message: str, arrays):
        super().__init__(message)
        self.arrays = arrays


def user_epsilon(cfg, rounds: int, sample_rate: float) -> float:
    acc = Accountant(cfg.privacy.accountant)
    acc.step(cfg.privacy.noise_multiplier, sample_rate, rounds)
    return acc.epsilon(cfg.privacy.delta)


def budget_stop(cfg, rnd: int, sample_rate: float) -> str:
    """Why round `rnd` must not run (its user-level ε would exceed privacy.target-epsilon),
    or "" when it may; both strategies (this wrapper, fedrec/federation/secagg.py) ask it."""
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


def wrap_user_dp(cfg, strategy, run, population: int, k: int, done_rounds: int = 0):
    p = cfg.privacy
    if cfg.fed.strategy not in ("fedavg", "fedprox", "fedadam"):
        raise FedrecError("config: privacy.mode = 'user' needs fed.strategy fedavg, fedprox or "
                          "fedadam "
                          f"(the noise is calibrated to a mean); got {cfg.fed.strategy!r}")
    if p.delta >= 1.0 / population:
        raise FedrecError(f"config: 'privacy.delta' must be below 1/{population} users for "
                          f"user-level DP; got {p.delta:g}")
    q = k / population
    adaptive = p.clipping == "adaptive"
    base = (DifferentialPrivacyClientSideAdaptiveClipping if adaptive
            else DifferentialPrivacyClientSideFixedClipping)

    class UserDP(base):
        def configure_train(self, server_round, arrays, config, grid):
            if stop := budget_stop(cfg, server_round + done_rounds, q):
                raise BudgetExhausted(stop, arrays)
            self.start_round()
            return super().configure_train(server_round, arrays, config, grid)

        def start_round(self):
            """This round's C (fixed, or adaptive's current one): what devices clip to and
            what the noise is scaled by; with fedadam that noise goes on the mean, before
            the server's Adam step (fedrec/federation/strategy.py), and this wrapper adds none."""
            self.round_norm = self.clipping_norm
            if cfg.fed.strategy == "fedadam":
                strategy.mean_noise_std = compute_stdv(self.model_sigma, self.round_norm, k)

        def _geometric_update(self, clipped_fraction):  # adaptive clipping only
            """C <- C exp(lr (clipped fraction - target)): more clipped than the target
            raises C (Andrew et al. 2021, with b = 1 - clipped). Flower 1.42 multiplies by
            exp(-lr (clipped fraction - target)), which moves C away from the target
            (measured: nothing clipped and C still grew), so the sign is fixed here."""
            self.clipping_norm *= math.exp(
                self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))

        def _add_noise_to_aggregated_arrays(self, aggregated):
            """Noise scaled by the C the devices clipped to this round (Flower's adaptive
            wrapper scales it by the C already updated for the next round)."""
            std = compute_stdv(self.noise_multiplier, self.round_norm, self.num_sampled_clients)
            return add_noise(aggregated, std) if std > 0 else aggregated

        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            rnd = server_round + done_rounds
            if arrays is not None and rnd in run.rounds and "train" in run.rounds[rnd]:
                eps = user_epsilon(cfg, rnd, q)  # every user: the same worst-case bound
                stats = {**run.rounds[rnd]["train"], "epsilon-max": eps, "epsilon-mean": eps,
                         "clipping-norm": self.round_norm}
                run.on_train(rnd, arrays, stats, strategy.server_state())  # the noised model
            return arrays, metrics

    clipping = ({"initial_clipping_norm": p.max_grad_norm, "clip_norm_lr": p.clip_norm_lr,
                 "target_clipped_quantile": p.clipped_quantile} if adaptive
                else {"clipping_norm": p.max_grad_norm})
    try:  # adaptive: sigma splits into the update's noise and the clipped count's
        dp = UserDP(strategy, noise_multiplier=p.noise_multiplier, num_sampled_clients=k,
                    **clipping)
    except ValueError as exc:
        raise FedrecError(f"config: privacy.clipping = '{p.clipping}': {exc}") from None
    dp.model_sigma = dp.noise_multiplier  # the update's noise multiplier
    if cfg.fed.strategy == "fedadam":  # noised on the mean instead (start_round)
        dp.noise_multiplier = 0.0
    dp.start_round()
    return dp


def add_noise(arrays: ArrayRecord, std: float) -> ArrayRecord:
    """arrays + N(0, std^2) per value, with the noise Flower's DP wrappers add."""
    values = [a.numpy().copy() for a in arrays.values()]
    add_gaussian_noise_inplace(values, std)
    return ArrayRecord({k: Array(v) for k, v in zip(arrays.keys(), values)})
