"""What one device does for one Flower message, behind the ClientApp (clients/app.py):
load its data and user-local state, run the local update or evaluation, keep its state,
and return the reply's content. User-local parameters stay in context.state (and, on a
simulated device, its own disk) and never enter a reply."""

from typing import NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedrec.config import Config
from fedrec.data.device import DATA_DIR, load_device_client
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.federation.faults import InjectedFailure, corrupt, planned_fault
from fedrec.federation.local import client_seed, local_evaluate, local_update
from fedrec.federation.local_store import keep, restore
from fedrec.privacy.accounting import Accountant


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
    accountant: dict | None  # this device's DP-SGD accountant history, if any


def load_job(msg: Message, context: Context, training: bool) -> Job:
    cfg, E, data, user, simulated = load_client(context)
    rnd = int(msg.content["config"]["server-round"])
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    local, acc = restore(context, cfg, user, rnd, training, simulated)
    seed = client_seed(cfg, user, rnd)
    return Job(cfg, E, data, arrays, local, seed, user, rnd, simulated, acc)


def load_client(context: Context) -> tuple[Config, np.ndarray, ClientData, int, bool]:
    """(config, catalog embeddings, the user's data, user id, simulated) for a ClientApp's
    Context: a virtual SuperNode's partition (user index: one virtual client per user,
    the population prepared once per process), or a real device's own files."""
    if DATA_DIR in context.node_config:
        cfg, E, data = load_device_client(context.run_config, context.node_config)
        return cfg, E, data, context.node_id, False  # node id: stable per registered SuperNode
    user = int(context.node_config["partition-id"])
    cfg = Config.from_flat(context.run_config)
    # One thread per client process: the simulation runs one actor per core, and torch's
    # default thread pool oversubscribes the cores (measured ~40x slower client updates).
    torch.set_num_threads(1)
    p = prepare(cfg)
    if not 0 <= user < p.split.n_users:
        raise ValueError(f"partition-id {user} outside 0..{p.split.n_users - 1}; run with "
                         "num-supernodes equal to the number of users")
    return cfg, p.item_emb, ClientData.from_split(p.split, user), user, True


def participation(cfg: Config, context: Context) -> float:
    """Expected fraction of rounds this device trains in: clients-per-round / population."""
    population = int(context.node_config.get("num-partitions", 0)) or cfg.fed.min_nodes
    k = cfg.fed.clients_per_round
    return 1.0 if not k or not population else min(1.0, k / population)


def train(msg: Message, context: Context) -> RecordDict:
    """The reply content of a train message: the updated federated arrays and metrics."""
    j = load_job(msg, context, True)
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
                                              accountant=acc, participation=participation(j.cfg, context))
    keep(context, j.cfg, j.user, j.round, j.simulated, new_local, acc)
    if j.cfg.privacy.mode == "user":  # equal weights, nothing data-dependent but the update
        metrics = {"num-examples": 1}
    if fault:
        params = corrupt(fault, j.arrays, params)
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
                       "metrics": MetricRecord(metrics)})



def evaluate(msg: Message, context: Context) -> RecordDict:
    """The reply content of an evaluate message: this device's ranking metrics."""
    j = load_job(msg, context, False)
    return RecordDict({"metrics": MetricRecord(local_evaluate(j.cfg, j.E, j.data, j.arrays,
                                                              j.local, j.seed))})
