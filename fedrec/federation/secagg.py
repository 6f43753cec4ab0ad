"""Secure aggregation (SecAgg+, `secagg.enabled = true`): the server learns only the sum.

Flower 1.42 has SecAgg+ only on its legacy path, so everything legacy lives in this
module: the server runs `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` with a
legacy FedAvg inside a `LegacyContext` (`serve`, called by server/app.py), and each device
answers through a NumPyClient-style legacy ClientApp with `secaggplus_mod` (`client_app`,
to which clients/app.py hands every message when the config says so). Rounds are recorded
into fedrec.federation.run_store.FederatedRun exactly like the Message API path
(results.json, metrics.csv, checkpoints, final.safetensors), and devices keep their
user-local state and DP-SGD accountant in context.state and on their own disk
(fedrec.federation.local_store), so a resumed run continues both.

A round, per device: it trains with fedrec.federation.local.local_update, computes its update
d = trained - global (federated parameters only), under privacy.mode = "user" clips it to
L2 norm privacy.max-grad-norm C, then hands [d, weight] to Flower's secaggplus_mod, which
scales d by weight / max_weight, clips every value to [-r, r] (secagg.clipping-range),
quantises it stochastically onto secagg.quantization-range levels and adds a private mask
plus pairwise masks with its neighbours (uniform mod 2**32; the pairwise ones cancel in
the sum). The masks' secrets are Shamir-shared among secagg.num-shares devices; the server
removes the surviving devices' private masks and the dropped devices' pairwise masks from
secagg.reconstruction-threshold shares each, and so obtains sum(w_i d_i) and sum(w_i) of
the devices whose masked vector arrived: the weighted mean update. fedavg and fedprox add
it to the global model (FedAvg on updates = FedAvg on parameters; fedprox devices train
with the proximal term); fedadam takes it as the pseudo-gradient of the FedAdam step
(server_opt.py, as the Message path). Quantisation error per
value of the mean is below n * 2r / levels / sum(w_i / max_weight) (n devices; tests
measure it); FedAdam's step scales it by at most eta_norm (1 - beta_1) / tau, times
fed.server-lr-ids on the per-item ID tables.

What the server sees from one device: two public keys, key shares encrypted for other
devices, its masked vector (uniformly random on its own), the shares it holds of its
neighbours' secrets, and the plaintext reply metadata: a status, the weight zeroed by
`hide_weight_mod` (it travels only inside the masked vector), and metrics that are empty
but for the device's own ε under privacy.mode = "sample". Weights: the history length
(as plain FedAvg), or 1 under either DP mode (as the DP paths do).

With privacy.mode = "user" the server turns the unmasked mean of the n updates into the
mean over the k sampled devices and adds N(0, (sigma C / k)^2) (server_opt.UserDP), and
accounts ε as the Message path does, stopping before a round that would exceed
privacy.target-epsilon. With privacy.mode = "sample" devices run DP-SGD as without SecAgg.

Not protected by SecAgg+: who takes part in a round; federated evaluation replies
(per-device hits, sent in the clear as without SecAgg); a server that also controls
enough devices (reconstruction-threshold colluding neighbours can unmask a device); a
server that brute-forces masks (Flower expands each from a 32-bit seed with numpy's
Mersenne Twister, so a device's masked vector rests on num-shares - 1 such seeds);
and poisoned updates, which the server can no longer inspect (so fed.max-update-norm,
fedmedian/fedtrimmedavg and the simulated faults are refused here). A device that drops
after uploading its masked vector is still in the sum; one that drops before is left out
(its neighbours' shares remove its pairwise masks); a round in which some device keeps
fewer than secagg.reconstruction-threshold live neighbours aggregates nothing and keeps
the previous global model (recorded as "kept-previous").

Size: Flower 1.42 has SecAgg+ only on its legacy path, so both sides of that path (server
workflow and recording strategy, device NumPyClient with client-side clipping) live in
this one module that the two apps hand over to.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_evaluate_workflow

from fedrec.config import Config
from fedrec.errors import FedrecError
from fedrec.federation.client_round import load_client, participation
from fedrec.federation.flower import seeded_sampling
from fedrec.federation.local import (
    aggregate_client_metrics,
    client_seed,
    local_evaluate,
    local_update,
)
from fedrec.federation.local_store import keep, restore
from fedrec.federation.server_opt import ServerAdam, UserDP, server_lr
from fedrec.federation.server_state import EpsilonTable, moments_from, pack
from fedrec.federation.strategy import clients_per_round
from fedrec.models.build import build_model
from fedrec.privacy.accounting import EPSILON_METRIC, Accountant, budget_stop, user_epsilon

DEVICE_MAX_WEIGHT = 1000  # deployment: weights are capped here (Flower's default max_weight)
MODULUS = 2**32  # SecAgg+ masks are uniform mod this (Flower's default modulus_range)
STRATEGIES = ("fedavg", "fedprox", "fedadam")  # what the mean update alone supports


# ----------------------------------------------------------------------------- checks

def check(cfg: Config, k: int, population: int) -> None:
    """Refuse what SecAgg+ cannot do, with one line naming the key and the fix.
    k: devices sampled per round."""
    s = cfg.secagg
    if cfg.fed.strategy not in STRATEGIES:
        raise FedrecError("config: secagg.enabled needs fed.strategy fedavg, fedprox or fedadam "
                          "(the server sees only the mean update; robust aggregators need "
                          f"single updates); got {cfg.fed.strategy!r}")
    if cfg.fed.max_update_norm > 0:
        raise FedrecError("config: with secagg.enabled the server cannot bound single updates; "
                          "set fed.max-update-norm = 0 (clip on the devices: privacy.mode = "
                          "'user')")
    if cfg.fed.failure_rate > 0 or cfg.fed.poison_rate > 0:
        raise FedrecError("config: simulated faults are not wired into SecAgg+; set "
                          "fed.failure-rate and fed.poison-rate to 0 with secagg.enabled")
    if k < s.reconstruction_threshold:
        raise FedrecError(f"config: secagg.enabled needs at least secagg.reconstruction-"
                          f"threshold ({s.reconstruction_threshold}) devices per round; got {k} "
                          "(raise fed.clients-per-round)")
    if k * s.quantization_range >= MODULUS:
        raise FedrecError(f"config: {k} devices per round x secagg.quantization-range "
                          f"{s.quantization_range} must stay below 2**32 (the masking modulus); "
                          f"set secagg.quantization-range <= {(MODULUS - 1) // k}")
    if cfg.privacy.mode == "user" and cfg.privacy.delta >= 1.0 / population:
        raise FedrecError(f"config: 'privacy.delta' must be below 1/{population} users for "
                          f"user-level DP; got {cfg.privacy.delta:g}")


# ----------------------------------------------------------------------------- device

def _names(cfg: Config, E: np.ndarray, n_items: int, parameters: list[np.ndarray]) -> list[str]:
    """The federated parameters' names, in the order the server sends them (the model's
    state_dict order, as FederatedRun.initial_arrays); shapes are checked."""
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg, E.shape[1], n_items)
              .state_dict().items()}
    got = [tuple(p.shape) for p in parameters]
    if list(shapes.values()) != got:
        raise ValueError(f"the server sent {len(got)} arrays of shapes {got[:3]}...; this "
                         f"device's model has {len(shapes)} ({list(shapes.values())[:3]}...)")
    return list(shapes)


class Device(NumPyClient):
    """One user's device on the legacy path: fedrec.federation.local does the work; the
    user-local parameters and the DP-SGD accountant stay on the device
    (fedrec.federation.local_store.restore / keep)."""

    def __init__(self, context: Context):
        self.context = context

    def _load(self, parameters, config, training: bool):
        ctx = self.context
        cfg, E, data, user, simulated = load_client(ctx)
        rnd = int(config["server-round"])
        arrays = dict(zip(_names(cfg, E, data.n_items, parameters), parameters))
        local, acc = restore(ctx, cfg, user, rnd, training, simulated)
        return cfg, E, data, arrays, local, acc, client_seed(cfg, user, rnd), user, rnd, simulated

    def fit(self, parameters, config):
        cfg, E, data, arrays, local, acc_state, seed, user, rnd, simulated = self._load(
            parameters, config, True)
        ctx, acc = self.context, None
        if cfg.privacy.mode == "sample":  # this device's cumulative accountant
            acc = Accountant.from_state(acc_state, cfg.privacy.accountant)
        mu = float(config.get("proximal-mu", 0.0))  # fedprox
        params, new_local, metrics = local_update(cfg, E, data, arrays, local, seed, mu,
                                                  accountant=acc,
                                                  participation=participation(cfg, ctx))
        keep(ctx, cfg, user, rnd, simulated, new_local, acc)
        update = [np.asarray(params[k], np.float64) - np.asarray(a, np.float64)
                  for k, a in arrays.items()]
        if cfg.privacy.mode == "user":  # client-side clipping before masking (DP-FedAvg)
            update = clip_update(update, cfg.privacy.max_grad_norm)
        if cfg.privacy.mode == "none":  # the mean training loss, securely aggregated too
            update.append(np.array([metrics["train-loss"]], np.float64))
        weight = 1 if cfg.privacy.mode != "none" else int(metrics["num-examples"])
        if not simulated:
            weight = min(weight, DEVICE_MAX_WEIGHT)
        # the plaintext reply carries no data-dependent value but the device's own ε
        return update, weight, ({EPSILON_METRIC: float(metrics[EPSILON_METRIC])} if acc is not None else {})

    def evaluate(self, parameters, config):
        cfg, E, data, arrays, local, _, seed, *_ = self._load(parameters, config, False)
        metrics = local_evaluate(cfg, E, data, arrays, local, seed)
        return 0.0, 1, {k: float(v) for k, v in metrics.items()}


def clip_update(update: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """Scale the whole update to L2 norm <= max_norm (Flower's fixed clipping rule)."""
    norm = math.sqrt(sum(float(np.sum(np.square(u))) for u in update))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [u * scale for u in update]


def hide_weight_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: secaggplus_mod has already put the weight inside the masked vector;
    zero its plaintext copy in the reply, so no single device's history length shows."""
    reply = call_next(msg, context)
    if reply.has_content() and "fitres.num_examples" in reply.content.metric_records:
        reply.content.metric_records["fitres.num_examples"]["num_examples"] = 0
    return reply


@cache
def client_app():
    """The device side: a legacy ClientApp over `Device` with secaggplus_mod."""
    return ClientApp(client_fn=lambda context: Device(context).to_client(),
                     mods=[hide_weight_mod, secaggplus_mod])


# ----------------------------------------------------------------------------- server

def _record(names: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(names, arrays)})


class SecAggFedAvg(FedAvg):
    """Legacy FedAvg under SecAggPlusWorkflow. Every result it is handed carries the same
    securely aggregated mean update; it adds that (plus DP noise) to the global model, or
    takes a FedAdam step with it (fed.strategy = "fedadam"), and records every round into
    the run like fedrec/federation/strategy.py does."""

    def __init__(self, cfg: Config, run, names: list[str], initial: list[np.ndarray],
                 population: int, k: int, done_rounds: int, server_state: dict | None = None):
        self.cfg, self.run, self.names, self.done = cfg, run, names, done_rounds

        def on_config(server_round: int) -> dict:
            return {"server-round": server_round + done_rounds}

        def on_fit_config(server_round: int) -> dict:
            mu = {"proximal-mu": cfg.fed.proximal_mu} if cfg.fed.strategy == "fedprox" else {}
            return {**on_config(server_round), **mu}

        super().__init__(fraction_fit=1.0 if k == population else 1e-9, min_fit_clients=k,
                         fraction_evaluate=1.0, min_evaluate_clients=population,
                         min_available_clients=population,
                         initial_parameters=ndarrays_to_parameters(initial),
                         on_fit_config_fn=on_fit_config, on_evaluate_config_fn=on_config)
        self.q = k / population  # user-level DP: sampling rate for the accountant
        self.sent = list(initial)  # the global arrays sent this round
        self.expected = {"train": 0, "evaluate": 0}
        self.epsilon = EpsilonTable(server_state)  # sample-level DP: node -> its cumulative ε
        self.stopped = ""  # why training stopped early (privacy budget)
        self.pending = None  # (server round, arrays): server-side evaluation still to run
        self.server_eval = run.evaluate_fn(done_rounds)
        self.adam = (ServerAdam(cfg, moments_from(server_state))
                     if cfg.fed.strategy == "fedadam" else None)
        self.dp = UserDP(cfg, k, population) if cfg.privacy.mode == "user" else None

    def configure_fit(self, server_round, parameters, client_manager):
        rnd = server_round + self.done
        if not self.stopped and (stop := budget_stop(self.cfg, rnd, self.q)):
            self.stopped = stop
            self.run.log(stop)
        if self.stopped:  # the workflow halts this round and runs the rest as no-ops
            return []
        if server_round == 1 and self.done:  # resumed: keep the devices still here
            self.epsilon.forget_absent(c.node_id for c in client_manager.all().values())
        self.sent = parameters_to_ndarrays(parameters)
        with seeded_sampling(self.cfg.train.seed, rnd):
            instructions = super().configure_fit(server_round, parameters, client_manager)
        self.expected["train"] = len(instructions)
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        rnd = server_round + self.done
        n, p = len(results), self.cfg.privacy
        stats = {"clients": n, "failures": self.expected["train"] - n}
        arrays = None
        if n and n >= self.cfg.fed.min_replies:
            mean = parameters_to_ndarrays(results[0][1].parameters)  # the same in every result
            if p.mode == "none":  # devices append their training loss (Device.fit)
                stats["train-loss"] = float(mean.pop()[0])
            delta = dict(zip(self.names, mean))
            if self.dp is not None:  # DP-FedAvg's noise, on the mean update
                delta = self.dp.noised(delta, n)
                stats["epsilon-max"] = stats["epsilon-mean"] = user_epsilon(self.cfg, rnd, self.q)
            sent = dict(zip(self.names, self.sent))
            if self.adam is not None:
                stats["server-lr"] = server_lr(self.cfg, rnd)
                new = self.adam.step(rnd, sent, delta)
            else:
                new = {k: (np.asarray(sent[k], np.float64) + d).astype(sent[k].dtype)
                       for k, d in delta.items()}
            arrays = [new[k] for k in self.names]
        stats.update(self.epsilon.update(  # sample-level DP: devices' own ε
            [(proxy.node_id, res.metrics) for proxy, res in results]))
        stats["kept-previous"] = int(arrays is None)
        self.run.on_train(rnd, dict(zip(self.names, arrays if arrays is not None else self.sent)),
                          stats, self.server_state())
        if arrays is None:
            return None, {}
        self.sent = arrays
        return ndarrays_to_parameters(arrays), {}

    def server_state(self) -> dict[str, np.ndarray]:
        """What a resumed run's server needs (fedrec/federation/server_state.py)."""
        return pack(self.adam.state() if self.adam else {}, self.epsilon)

    def evaluate(self, server_round, parameters):
        """Server-side evaluation; run after the federated one, as the Message API
        strategies order them (so a round's log line shows both)."""
        rnd = server_round + self.done
        if self.stopped:
            return
        if server_round > 0 and "train" not in self.run.rounds.get(rnd, {}):
            # SecAgg+ halted (too few live neighbours): nothing aggregated, model kept
            self.run.on_train(rnd, dict(zip(self.names, self.sent)),
                              {"clients": 0, "failures": self.expected["train"],
                               "kept-previous": 1, "secagg-halted": 1})
        self.pending = (server_round, _record(self.names, parameters_to_ndarrays(parameters)))
        if server_round == 0:
            self.flush_pending()

    def flush_pending(self) -> None:
        if self.pending is not None:
            server_round, arrays = self.pending
            self.pending = None
            self.server_eval(server_round, arrays)

    def configure_evaluate(self, server_round, parameters, client_manager):
        if self.stopped or not self.run.is_eval_round(server_round + self.done):
            self.flush_pending()
            return []
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        self.expected["evaluate"] = len(instructions)
        return instructions

    def aggregate_evaluate(self, server_round, results, failures):
        rnd = server_round + self.done
        self.run.record(rnd, "evaluate", {"clients": len(results),
                                          "failures": self.expected["evaluate"] - len(results)})
        metrics = aggregate_client_metrics([{k: float(v) for k, v in res.metrics.items()}
                                            for _, res in results])
        if metrics:
            self.run.record(rnd, "federated", metrics)
        self.flush_pending()
        return None, metrics


class _Timeout:
    """The grid with fed.round-timeout as its default wait: Flower's legacy evaluate round
    would otherwise wait for ever for a device that never answers."""

    def __init__(self, grid, timeout: float):
        self._grid, self._timeout = grid, timeout

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(
            messages, timeout=self._timeout if timeout is None else timeout)


def max_weight(cfg: Config, run) -> float:
    """Largest weight a device can send: 1 under DP (equal weights), else the longest
    history (simulation; the server holds the split) or DEVICE_MAX_WEIGHT (deployment).
    Tight is better: each device's values are scaled by weight / max_weight before
    quantisation."""
    if cfg.privacy.mode != "none":
        return 1.0
    if run.deployed:
        return float(DEVICE_MAX_WEIGHT)
    return float(max(1, int(np.diff(run.prepared.split.train_ptr).max())))


def serve(grid, context: Context, cfg: Config, run) -> None:
    """The ServerApp's main under secagg.enabled: the run (a FederatedRun) trains
    fed.num-rounds rounds of SecAgg+ FedAvg and is finished (or resumed) as usual."""
    population = run.population
    k = clients_per_round(cfg, population)
    check(cfg, k, population)
    done, arrays, state = run.resume() if cfg.fed.resume else (0, run.initial_arrays(), {})
    # legacy parameters are a list: send them in the model's state_dict order, which devices
    # expect (a resumed checkpoint comes back in alphabetical order)
    names = list((run.initial_arrays() if cfg.fed.resume else arrays).keys())
    strategy = SecAggFedAvg(cfg, run, names, [arrays[n].numpy() for n in names], population,
                            k, done, state)
    s, timeout = cfg.secagg, cfg.fed.round_timeout
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold,
            max_weight=max_weight(cfg, run), clipping_range=s.clipping_range,
            quantization_range=s.quantization_range, modulus_range=MODULUS, timeout=timeout),
        evaluate_workflow=lambda g, c: default_evaluate_workflow(_Timeout(g, timeout), c))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.fed.num_rounds - done,
                                                        round_timeout=timeout),
                           strategy=strategy)
    run.log(f"secure aggregation: SecAgg+ over {k} devices per round, {s.num_shares} shares, "
            f"threshold {s.reconstruction_threshold}, values clipped to "
            f"±{s.clipping_range:g} on {s.quantization_range} levels")
    workflow(grid, legacy)
    strategy.flush_pending()
    run.finish(_record(names, strategy.sent), stopped=strategy.stopped)
