"""The server's strategy. A Flower strategy chosen by config samples the devices and
aggregates their replies (FedAvg, FedProx, FedMedian, FedTrimmedAvg; fedadam is FedAvg's
mean followed by the FedAdam step of server_opt.py), held by `Recording`, which around it,
every round:

- samples exactly fed.clients-per-round devices, seeded by (train.seed, round), so a
  resumed run samples what the uninterrupted one would have (given the same node ids, as
  in the in-process engine); fed.sampling = "balanced" trains the devices in a seeded
  order, k at a time in turn (flower.py);
- checks replies before Flower sees them (replies.py): bad ones are dropped and counted,
  updates are norm-bounded when fed.max-update-norm > 0, and with fewer than
  fed.min-replies valid replies the round keeps the previous global model;
- takes the server's step (server_opt.py: FedAdam; user-level DP noise on the mean
  update before it, stopping before a round that would exceed privacy.target-epsilon);
- records the round into the run (run_store.py), numbering rounds from done_rounds + 1,
  so a resumed run continues the count.
"""

from contextlib import nullcontext

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedrec.config import Config
from fedrec.errors import FedrecError
from fedrec.federation.flower import balanced_sampling, seeded_sampling
from fedrec.federation.local import aggregate_client_metrics
from fedrec.federation.replies import (
    bound_update,
    evaluate_problem,
    filter_replies,
    train_problem,
    update_norm,
)
from fedrec.federation.run_store import FederatedRun
from fedrec.federation.server_opt import ServerAdam, UserDP, server_lr
from fedrec.federation.server_state import EpsilonTable, moments_from, pack
from fedrec.privacy.accounting import budget_stop, user_epsilon

AGGREGATORS = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAvg, "fedmedian": FedMedian,
               "fedtrimmedavg": FedTrimmedAvg}


class BudgetExhausted(FedrecError):
    """Raised before a round that would exceed privacy.target-epsilon; holds the model."""

    def __init__(self, message: str, arrays):
        super().__init__(message)
        self.arrays = arrays


def clients_per_round(cfg: Config, population: int) -> int:
    """fed.clients-per-round (0 = every device), refused when above the population."""
    k = cfg.fed.clients_per_round or population
    if k > population:
        raise FedrecError(f"config: 'fed.clients-per-round' must be <= the {population} users "
                          f"(devices); got {k}. Use {population} or fewer, or 0 for every user")
    return k


class Recording(Strategy):
    """population: devices expected online (every user in simulation). done_rounds and
    server_state: where a resumed run continues (FederatedRun.resume)."""

    def __init__(self, cfg: Config, run: FederatedRun, population: int, done_rounds: int = 0,
                 server_state: dict | None = None):
        super().__init__()
        f = cfg.fed
        k = clients_per_round(cfg, population)
        if f.min_replies > k:
            raise FedrecError(f"config: 'fed.min-replies' must be <= the {k} clients per "
                              f"round; got {f.min_replies}")
        kwargs = {  # fraction ~0: the sample is exactly min_train_nodes; waiting for the
            # whole population first avoids round-1 under-sampling while nodes register
            "fraction_train": 1.0 if k == population else 1e-9, "min_train_nodes": k,
            "fraction_evaluate": 1.0, "min_evaluate_nodes": population,
            "min_available_nodes": population}
        if f.strategy == "fedprox":
            kwargs["proximal_mu"] = f.proximal_mu
        if f.strategy == "fedtrimmedavg":
            kwargs["beta"] = f.trim_beta
        self.inner = AGGREGATORS[f.strategy](**kwargs)
        self.cfg, self.run, self.done, self.q = cfg, run, done_rounds, k / population
        self.adam = ServerAdam(cfg, moments_from(server_state)) if f.strategy == "fedadam" else None
        self.dp = UserDP(cfg, k, population) if cfg.privacy.mode == "user" else None
        if self.dp and self.dp.tree and done_rounds:
            raise FedrecError("privacy.noise = 'tree' cannot resume a run: the tree's node "
                              "noise is not stored; start the run again")
        self.epsilon = EpsilonTable(server_state)  # node -> its cumulative DP-SGD ε
        self.sent: dict[str, np.ndarray] = {}  # the global arrays sent this round
        self.expected = {"train": 0, "evaluate": 0}  # messages sent this round

    def summary(self) -> None:
        self.inner.summary()

    def _configure(self, kind, rnd, arrays, config, grid):
        balanced = kind == "train" and self.cfg.fed.sampling == "balanced"
        with seeded_sampling(self.cfg.train.seed, rnd), (
                balanced_sampling(self.cfg.train.seed, rnd) if balanced else nullcontext()):
            messages = list(getattr(self.inner, f"configure_{kind}")(rnd, arrays, config, grid))
        self.expected[kind] = len(messages)
        return messages

    def configure_train(self, server_round, arrays, config, grid):
        rnd = server_round + self.done
        if self.dp and (stop := budget_stop(self.cfg, rnd, self.q)):
            raise BudgetExhausted(stop, arrays)
        if server_round == 1 and self.done:  # resumed: keep the devices still here
            self.epsilon.forget_absent(grid.get_node_ids())
        self.sent = {k: a.numpy() for k, a in arrays.items()}
        if self.dp:  # what the devices' clipping mod clips to
            config[KEY_CLIPPING_NORM] = self.dp.clip
        return self._configure("train", rnd, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        rnd = server_round + self.done
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
        bound = self.cfg.fed.max_update_norm
        norms = [bound_update(m, self.sent, bound) if bound > 0 else update_norm(m, self.sent)
                 for m in ok]
        if norms:
            stats["update-norm-median"] = float(np.median(norms))
            stats["update-norm-max"] = max(norms)
        if bound > 0:
            stats["clipped"] = sum(n > bound for n in norms)
        arrays, metrics = None, None
        if len(ok) >= self.cfg.fed.min_replies:
            mean, metrics = self.inner.aggregate_train(rnd, ok)
            if mean is not None:
                arrays = self._step(rnd, {k: a.numpy() for k, a in mean.items()}, ok, stats)
        stats["kept-previous"] = int(arrays is None)
        self.run.on_train(rnd, arrays if arrays is not None else self.sent,
                          {**(metrics or {}), **stats}, self.server_state())
        if arrays is None:
            return None, metrics
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics

    def _step(self, rnd: int, mean: dict, ok: list, stats: dict) -> dict[str, np.ndarray]:
        """The new global arrays from the aggregate of this round's replies."""
        sent = self.sent
        if self.dp is None and self.adam is None:
            return {k: m.astype(sent[k].dtype, copy=False) for k, m in mean.items()}
        delta = {k: m - sent[k] for k, m in mean.items()}
        if self.dp is not None:
            stats["clipping-norm"] = self.dp.clip  # what the devices clipped to
            clipped = sum(int(bool(m.content["metrics"].get(KEY_NORM_BIT, 0))) for m in ok)
            delta = self.dp.noised(delta, len(ok), clipped, rnd)
            stats["epsilon-max"] = stats["epsilon-mean"] = user_epsilon(self.cfg, rnd, self.q)
        if self.adam is not None:
            stats["server-lr"] = server_lr(self.cfg, rnd)
            return self.adam.step(rnd, sent, delta)
        return {k: (sent[k] + d).astype(sent[k].dtype) for k, d in delta.items()}

    def configure_evaluate(self, server_round, arrays, config, grid):
        rnd = server_round + self.done
        if not self.run.is_eval_round(rnd):
            self.expected["evaluate"] = 0
            return []
        return self._configure("evaluate", rnd, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        rnd = server_round + self.done
        if not self.expected["evaluate"]:
            return None
        ok, failures = filter_replies(replies, self.expected["evaluate"], evaluate_problem)
        self.run.record(rnd, "evaluate", {"clients": len(ok), "failures": sum(failures.values()),
                                          **{f"failures/{r}": n for r, n in failures.items()}})
        metrics = aggregate_client_metrics([{k: float(v) for k, v in m.content["metrics"].items()}
                                            for m in ok])
        if not metrics:
            return None
        self.run.record(rnd, "federated", metrics)
        return MetricRecord(metrics)

    def server_state(self) -> dict[str, np.ndarray]:
        """What a resumed run's server needs (server_state.py)."""
        return pack(self.adam.state() if self.adam else {}, self.epsilon)
