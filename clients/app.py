"""Flower ClientApp: one device = one user. Unpack, load the user's data, call fedrec,
pack, reply. User-local parameters stay in context.state and never enter a reply.

Two ways to find the user's data: a real device names its own directory in node_config
"data-dir" (fedrec.device documents the layout); a virtual SuperNode of the simulation
gets "partition-id" = its user index in the run's dataset.
"""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.device import DATA_DIR, load_device_client
from fedrec.federated import client_seed, load_simulated_client, local_evaluate, local_update

app = ClientApp()
LOCAL = "user-local"  # context.state key of the user-local parameters


def _load(msg: Message, context: Context):
    if DATA_DIR in context.node_config:  # a real device: its own files only
        cfg, E, data = load_device_client(context.run_config, context.node_config)
        user = context.node_id  # stable per registered SuperNode
    else:
        user = int(context.node_config["partition-id"])
        cfg, E, data = load_simulated_client(context.run_config, user)
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    local = ({k: a.numpy() for k, a in context.state[LOCAL].items()}
             if LOCAL in context.state else None)
    seed = client_seed(cfg, user, int(msg.content["config"]["server-round"]))
    return cfg, E, data, arrays, local, seed


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, E, data, arrays, local, seed = _load(msg, context)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    params, new_local, metrics = local_update(cfg, E, data, arrays, local, seed, mu)
    if new_local:
        context.state[LOCAL] = ArrayRecord({k: Array(v) for k, v in new_local.items()})
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
                        "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, E, data, arrays, local, seed = _load(msg, context)
    metrics = local_evaluate(cfg, E, data, arrays, local, seed)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
