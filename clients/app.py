"""Flower ClientApp: one device = one user. Unpack, load the user's data, call fedrec,
pack, reply. User-local parameters stay in context.state and never enter a reply."""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.federated import client_seed, load_simulated_client, local_evaluate, local_update

app = ClientApp()
LOCAL = "user-local"  # context.state key of the user-local parameters


def _load(msg: Message, context: Context):
    cfg, E, data = load_simulated_client(context.run_config, int(context.node_config["partition-id"]))
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    local = ({k: a.numpy() for k, a in context.state[LOCAL].items()}
             if LOCAL in context.state else None)
    seed = client_seed(cfg, int(context.node_config["partition-id"]),
                       int(msg.content["config"]["server-round"]))
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
