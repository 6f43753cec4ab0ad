"""Flower strategy chosen by config (FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg),
sampling exactly `fed.clients-per-round` devices every round, recording every round into
the run.

Around the chosen Flower strategy, every round:
- sampling is seeded by (train.seed, round), so a resumed run samples what the
  uninterrupted one would have (given the same node ids, as in the in-process engine);
  fed.sampling = "balanced" trains the devices in a seeded order, k at a time in turn;
- replies are checked before Flower sees them (fedrec/federation/replies.py): bad ones are dropped
  and counted, updates are norm-bounded when fed.max-update-norm > 0, and with fewer
  than fed.min-replies valid replies the round keeps the previous global model;
- rounds are numbered from `done_rounds + 1` on, so a resumed run continues the count.
"""

import random
from contextlib import contextmanager, nullcontext

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from fedrec.config import Config
from fedrec.errors import FedrecError
from fedrec.federation.local import aggregate_client_metrics
from fedrec.federation.replies import (
    bound_update,
    evaluate_problem,
    filter_replies,
    train_problem,
    update_norm,
)
from fedrec.federation.run_store import FederatedRun
from fedrec.federation.server_state import MOMENTS, EpsilonTable, moments_from, pack
from fedrec.privacy.user_dp import add_noise

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedmedian": FedMedian,
         "fedtrimmedavg": FedTrimmedAvg}


def _aggregate_eval(records, weighted_by_key: str) -> MetricRecord:
    return MetricRecord(aggregate_client_metrics(
        [{k: float(v) for k, v in rd["metrics"].items()} for rd in records]))


@contextmanager
def _seeded_sampling(seed: int, server_round: int):
    """Flower samples nodes with the global `random`: seed it per round, then restore it."""
    outer = random.getstate()
    random.seed(int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0]))
    try:
        yield
    finally:
        random.setstate(outer)


@contextmanager
def _balanced_sampling(seed: int, server_round: int):
    """fed.sampling = "balanced": a seeded order of the connected devices, taken k at a
    time in turn (round t trains positions (t - 1) k .. t k - 1, wrapping around), so every
    device joins the same number of rounds, +-1, and none more than ceil(T k / N): the
    participation sample-level DP solves sigma for. Flower's configure_train samples with
    its module's sample_nodes, which this replaces for one call (it still waits for the
    devices as Flower does)."""
    import flwr.serverapp.strategy.fedavg as flower_fedavg

    flower_sample = flower_fedavg.sample_nodes

    def in_turn(grid, min_available_nodes: int, sample_size: int):
        _, nodes = flower_sample(grid, min_available_nodes, sample_size)
        ids = sorted(nodes)  # Python ints: node ids use all 64 bits, beyond numpy's int64
        order = [ids[i] for i in np.random.default_rng([seed, 1]).permutation(len(ids))]
        start = (server_round - 1) * sample_size
        return [order[(start + i) % len(order)] for i in range(sample_size)], nodes

    flower_fedavg.sample_nodes = in_turn
    try:
        yield
    finally:
        flower_fedavg.sample_nodes = flower_sample


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


def server_lr_scale(cfg: Config, name: str) -> float:
    """The multiplier of FedAdam's step for array `name`: fed.server-lr-ids for the model's
    per-item ID tables (fedrec.models.build.ID_TABLES), 1 for the rest. Adam's moments do
    not depend on the lr, so scaling an array's step is Adam with that array's lr scaled."""
    from fedrec.models.build import ID_TABLES

    return cfg.fed.server_lr_ids if name.startswith(ID_TABLES[cfg.model.kind]) else 1.0


def clients_per_round(cfg: Config, population: int) -> int:
    """fed.clients-per-round (0 = every device), refused when above the population."""
    k = cfg.fed.clients_per_round or population
    if k > population:
        raise FedrecError(f"config: 'fed.clients-per-round' must be <= the {population} users "
                          f"(devices); got {k}. Use {population} or fewer, or 0 for every user")
    return k


def make_strategy(cfg: Config, run: FederatedRun, population: int, done_rounds: int = 0,
                  server_state: dict | None = None):
    """population: devices expected online (every user in simulation). done_rounds and
    server_state: where a resumed run continues (FederatedRun.resume)."""
    base = BASES[cfg.fed.strategy]
    k = clients_per_round(cfg, population)
    if cfg.fed.min_replies > k:
        raise FedrecError(f"config: 'fed.min-replies' must be <= the {k} clients per round; "
                          f"got {cfg.fed.min_replies}")
    kwargs = {
        # fraction ~0 makes the sample size exactly min_train_nodes; waiting for the whole
        # population first avoids round-1 under-sampling while virtual nodes register.
        "fraction_train": 1.0 if k == population else 1e-9, "min_train_nodes": k,
        "fraction_evaluate": 1.0, "min_evaluate_nodes": population, "min_available_nodes": population,
        "evaluate_metrics_aggr_fn": _aggregate_eval}
    if base is FedProx:
        kwargs["proximal_mu"] = cfg.fed.proximal_mu
    if base is FedAdam:
        kwargs.update(eta=cfg.fed.server_lr, eta_l=cfg.train.lr, tau=cfg.fed.server_tau)
    if base is FedTrimmedAvg:
        kwargs["beta"] = cfg.fed.trim_beta
    f = cfg.fed

    class Recording(base):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.sent: dict[str, np.ndarray] = {}  # the global arrays sent this round
            self.expected = {"train": 0, "evaluate": 0}  # messages sent this round
            self.epsilon = EpsilonTable(server_state)  # node -> its cumulative DP-SGD ε
            self.mean_noise_std = 0.0  # user-level DP with FedAdam (fedrec/privacy/user_dp.py)

        def _configure(self, kind, server_round, arrays, config, grid):
            rnd = server_round + done_rounds
            parent = getattr(super(), f"configure_{kind}")
            balanced = kind == "train" and cfg.fed.sampling == "balanced"
            with _seeded_sampling(cfg.train.seed, rnd), (
                    _balanced_sampling(cfg.train.seed, rnd) if balanced else nullcontext()):
                messages = list(parent(rnd, arrays, config, grid))
            self.expected[kind] = len(messages)
            return messages

        def configure_train(self, server_round, arrays, config, grid):
            if server_round == 1 and done_rounds:  # resumed: keep the devices still here
                self.epsilon.forget_absent(grid.get_node_ids())
            self.sent = {k: a.numpy() for k, a in arrays.items()}
            return self._configure("train", server_round, arrays, config, grid)

        def configure_evaluate(self, server_round, arrays, config, grid):
            if not run.is_eval_round(server_round + done_rounds):
                self.expected["evaluate"] = 0
                return []
            return self._configure("evaluate", server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            rnd = server_round + done_rounds
            ok, failures = filter_replies(replies, self.expected["train"],
                                          lambda m: train_problem(m, self.sent))
            stats = {"clients": len(ok), "failures": sum(failures.values()),
                     **{f"failures/{r}": n for r, n in failures.items()}}
            if ok:  # for the benchmark: unweighted mean over devices, bytes of one upload
                if "update-seconds" in ok[0].content["metrics"]:  # same keys in every reply
                    stats["update-seconds-mean"] = sum(
                        float(m.content["metrics"]["update-seconds"]) for m in ok) / len(ok)
                stats["upload-bytes"] = sum(  # from metadata: no need to deserialise
                    int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                    for a in ok[0].content["arrays"].values())
            stats.update(self.epsilon.update(  # sample-level DP: devices' own ε
                [(m.metadata.src_node_id, m.content["metrics"]) for m in ok]))
            # update norms (before any bounding): what fed.max-update-norm should be set from
            bound = f.max_update_norm
            norms = [bound_update(m, self.sent, bound) if bound > 0 else update_norm(m, self.sent)
                     for m in ok]
            if norms:
                stats["update-norm-median"] = float(np.median(norms))
                stats["update-norm-max"] = max(norms)
            if bound > 0:
                stats["clipped"] = sum(n > bound for n in norms)
            arrays, metrics = None, None
            if base is FedAdam:
                self.eta = server_lr(cfg, rnd)
                stats["server-lr"] = self.eta
            if len(ok) >= f.min_replies:
                arrays, metrics = super().aggregate_train(rnd, ok)
                if arrays is not None:  # FedAdam's step computes in float64: keep the dtype sent
                    arrays = ArrayRecord({k: Array(self._scaled(k, a.numpy()).astype(
                        self.sent[k].dtype, copy=False)) for k, a in arrays.items()})
            stats["kept-previous"] = int(arrays is None)
            run.on_train(rnd, arrays if arrays is not None else self.sent,
                         {**(metrics or {}), **stats}, self.server_state())
            return arrays, metrics

        def _scaled(self, name, new):
            """The aggregate of `name`; FedAdam's step scaled by server_lr_scale."""
            s = server_lr_scale(cfg, name) if base is FedAdam else 1.0
            return new if s == 1.0 else self.sent[name] + s * (new - self.sent[name])

        def aggregate_evaluate(self, server_round, replies):
            rnd = server_round + done_rounds
            if not self.expected["evaluate"]:
                return None
            ok, failures = filter_replies(replies, self.expected["evaluate"], evaluate_problem)
            run.record(rnd, "evaluate", {"clients": len(ok), "failures": sum(failures.values()),
                                         **{f"failures/{r}": n for r, n in failures.items()}})
            metrics = super().aggregate_evaluate(rnd, ok)
            if metrics:
                run.record(rnd, "federated", metrics)
            return metrics

        def _compute_deltat_and_mt(self, aggregated):  # FedAdam's step (FedOpt) only
            """User-level DP with FedAdam (fedrec/privacy/user_dp.py): noise on the mean
            update, before the server optimizer sees it, so Adam's moments are
            post-processing."""
            if self.mean_noise_std > 0:
                aggregated = add_noise(aggregated, self.mean_noise_std)
            return super()._compute_deltat_and_mt(aggregated)

        def server_state(self) -> dict[str, np.ndarray]:
            """What a resumed run's server needs (fedrec/federation/server_state.py)."""
            return pack({name: getattr(self, name, None) for name in MOMENTS}, self.epsilon)

    Recording.__name__ = base.__name__
    strategy = Recording(**kwargs)
    for name, part in moments_from(server_state).items():  # a resumed run's FedAdam moments
        setattr(strategy, name, part)
    if cfg.privacy.mode == "user":  # DP-FedAvg around it (fedrec/privacy/user_dp.py)
        from fedrec.privacy.user_dp import wrap_user_dp

        return wrap_user_dp(cfg, strategy, run, population, k, done_rounds)
    return strategy
