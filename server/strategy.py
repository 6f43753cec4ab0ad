"""Flower strategy chosen by config (FedAvg, FedProx, FedAdam), sampling exactly
`fed.clients-per-round` devices every round, recording every round into the run."""

from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedrec.config import Config
from fedrec.federated import aggregate_client_metrics
from server.run import FederatedRun


def _aggregate_eval(records, weighted_by_key: str) -> MetricRecord:
    return MetricRecord(aggregate_client_metrics(
        [{k: float(v) for k, v in rd["metrics"].items()} for rd in records]))


def make_strategy(cfg: Config, run: FederatedRun, population: int):
    """population: devices expected online (every user in simulation)."""
    base = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[cfg.fed.strategy]
    k = cfg.fed.clients_per_round or population
    if k > population:
        raise ValueError(f"fed.clients-per-round={k} exceeds the {population} available devices")
    kwargs = dict(
        # fraction ~0 makes the sample size exactly min_train_nodes; waiting for the whole
        # population first avoids round-1 under-sampling while virtual nodes register.
        fraction_train=1.0 if k == population else 1e-9, min_train_nodes=k,
        fraction_evaluate=1.0, min_evaluate_nodes=population, min_available_nodes=population,
        evaluate_metrics_aggr_fn=_aggregate_eval)
    if base is FedProx:
        kwargs["proximal_mu"] = cfg.fed.proximal_mu
    if base is FedAdam:
        kwargs.update(eta=cfg.fed.server_lr, eta_l=cfg.train.lr)

    class Recording(base):
        def configure_evaluate(self, server_round, arrays, config, grid):
            if not run.is_eval_round(server_round):
                return []
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            ok = [m for m in replies if not m.has_error()]
            stats = {}
            if ok:  # unweighted means over devices, for the benchmark
                stats["update-seconds-mean"] = sum(
                    float(m.content["metrics"]["update-seconds"]) for m in ok) / len(ok)
                stats["upload-bytes"] = sum(a.numpy().nbytes
                                            for a in ok[0].content["arrays"].values())
            run.on_train(server_round, arrays, len(ok), len(replies) - len(ok),
                         {**(metrics or {}), **stats})
            return arrays, metrics

        def aggregate_evaluate(self, server_round, replies):
            metrics = super().aggregate_evaluate(server_round, replies)
            if metrics:
                run.record(server_round, "federated", metrics)
            return metrics

    Recording.__name__ = base.__name__
    return Recording(**kwargs)
