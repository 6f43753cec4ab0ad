"""Flower ClientApp: one device = one user. Unpack, load the user's data, call fedrec,
pack, reply. User-local parameters stay in context.state and never enter a reply.

Two ways to find the user's data: a real device names its own directory in node_config
"data-dir" (fedrec.device documents the layout); a virtual SuperNode of the simulation
gets "partition-id" = its user index in the run's dataset, keeps its user-local state on
its simulated disk too (fedrec.local_store, for resumed runs) and misbehaves when the
simulation asks it to (fedrec.faults).
"""

from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fedrec.accounting import Accountant
from fedrec.config import Config
from fedrec.device import load_client
from fedrec.faults import InjectedFailure, corrupt, planned_fault
from fedrec.federated import (
    ClientData,
    client_seed,
    local_evaluate,
    local_update,
)
from fedrec.local_store import keep, restore

app = ClientApp()


class Job(NamedTuple):
    cfg: Config
    E: np.ndarray
    data: ClientData
    arrays: dict
    local: dict | None
    seed: int
    user: int
    round: int
    simulated: bool
    accountant: dict | None  # this device's DP-SGD accountant history (privacy.py), if any


def _load(msg: Message, context: Context, training: bool) -> Job:
    cfg, E, data, user, simulated = load_client(context)
    rnd = int(msg.content["config"]["server-round"])
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    local, acc = restore(context, cfg, user, rnd, training, simulated)
    seed = client_seed(cfg, user, rnd)
    return Job(cfg, E, data, arrays, local, seed, user, rnd, simulated, acc)


def _participation(j: Job, context: Context) -> float:
    """Expected fraction of rounds this device trains in: clients-per-round / population."""
    population = int(context.node_config.get("num-partitions", 0)) or j.cfg.fed.min_nodes
    k = j.cfg.fed.clients_per_round
    return 1.0 if not k or not population else min(1.0, k / population)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """privacy.mode = "user": Flower's fixedclipping_mod (or adaptiveclipping_mod, which also
    reports whether it clipped) clips this device's update. It is
    applied here, by config, rather than in @app.train(mods=...), which is fixed at import
    time and would fail every message without a clipping norm."""
    if context.run_config.get("secagg.enabled"):  # hook: SecAgg+ (fedrec/secagg.py)
        from fedrec.secagg import client_app
        return client_app()(msg, context)
    privacy = Config.from_flat(context.run_config).privacy
    if privacy.mode == "user":
        mod = adaptiveclipping_mod if privacy.clipping == "adaptive" else fixedclipping_mod
        return mod(msg, context, _train)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    j = _load(msg, context, True)
    f = j.cfg.fed
    fault = planned_fault(j.cfg.train.seed, j.user, j.round, f.failure_rate, f.failure_kind,
                          f.poison_rate) if j.simulated else None
    if fault == "raise":
        raise InjectedFailure(f"injected failure of client {j.user} in round {j.round}")
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    acc = None
    if j.cfg.privacy.mode == "sample":  # this device's cumulative accountant
        acc = Accountant.from_state(j.accountant, j.cfg.privacy.accountant)
    params, new_local, metrics = local_update(j.cfg, j.E, j.data, j.arrays, j.local, j.seed, mu,
                                              accountant=acc, participation=_participation(j, context))
    keep(context, j.cfg, j.user, j.round, j.simulated, new_local, acc)
    if j.cfg.privacy.mode == "user":  # equal weights, nothing data-dependent but the update
        metrics = {"num-examples": 1}
    if fault:
        params = corrupt(fault, j.arrays, params)
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
                        "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if context.run_config.get("secagg.enabled"):  # hook: SecAgg+ (fedrec/secagg.py)
        from fedrec.secagg import client_app
        return client_app()(msg, context)
    j = _load(msg, context, False)
    metrics = local_evaluate(j.cfg, j.E, j.data, j.arrays, j.local, j.seed)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
