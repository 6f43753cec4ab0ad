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
(server/strategy.py), so the Adam moments only post-process noised means; Flower's
wrapper, which would noise the model after that step, then adds none.
"""

from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from fedrec.errors import FedrecError
from fedrec.privacy import Accountant, label


class BudgetExhausted(FedrecError):
    """Raised before a round that would exceed privacy.target-epsilon; holds the model."""

    def __init__(self, message: str, arrays):
        super().__init__(message)
        self.arrays = arrays


def user_epsilon(cfg, rounds: int, sample_rate: float) -> float:
    acc = Accountant(cfg.privacy.accountant)
    acc.step(cfg.privacy.noise_multiplier, sample_rate, rounds)
    return acc.epsilon(cfg.privacy.delta)


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

    class UserDP(DifferentialPrivacyClientSideFixedClipping):
        def configure_train(self, server_round, arrays, config, grid):
            rnd = server_round + done_rounds
            eps = user_epsilon(cfg, rnd, q)
            if p.target_epsilon > 0 and eps > p.target_epsilon:
                spent = user_epsilon(cfg, rnd - 1, q) if rnd > 1 else 0.0
                raise BudgetExhausted(
                    f"privacy budget exhausted: round {rnd} would bring {label(cfg)} to "
                    f"{eps:.3f} > privacy.target-epsilon {p.target_epsilon:g} (spent after "
                    f"round {rnd - 1}: {spent:.3f}); stopped before it", arrays)
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            rnd = server_round + done_rounds
            if arrays is not None and rnd in run.rounds and "train" in run.rounds[rnd]:
                eps = user_epsilon(cfg, rnd, q)  # every user: the same worst-case bound
                stats = {**run.rounds[rnd]["train"], "epsilon-max": eps, "epsilon-mean": eps}
                run.on_train(rnd, arrays, stats, strategy.server_state())  # the noised model
            return arrays, metrics

    sigma = p.noise_multiplier
    if cfg.fed.strategy == "fedadam":  # noise the mean before Adam, not the model after it
        strategy.mean_noise_std, sigma = compute_stdv(sigma, p.max_grad_norm, k), 0.0
    return UserDP(strategy, noise_multiplier=sigma,
                  clipping_norm=p.max_grad_norm, num_sampled_clients=k)


def add_noise(arrays: ArrayRecord, std: float) -> ArrayRecord:
    """arrays + N(0, std^2) per value, with the noise Flower's DP wrappers add."""
    values = [a.numpy().copy() for a in arrays.values()]
    add_gaussian_noise_inplace(values, std)
    return ArrayRecord({k: Array(v) for k, v in zip(arrays.keys(), values)})
