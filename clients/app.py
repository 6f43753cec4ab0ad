"""Flower ClientApp: one device = one user. Flower glue only: the round itself is
fedrec.federation.client_round (load the user's data and state, train or evaluate, keep
the state, the reply's content); SecAgg+ hands over to fedrec/federation/secagg.py.

Two ways to find the user's data: a real device names its own directory in node_config
"data-dir" (fedrec.data.device documents the layout); a virtual SuperNode of the
simulation gets "partition-id" = its user index in the run's dataset, keeps its
user-local state on its simulated disk too (fedrec.federation.local_store, for resumed
runs) and misbehaves when the simulation asks it to (fedrec.federation.faults).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fedrec.config import Config
from fedrec.federation import client_round, flower, secagg

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """privacy.mode = "user": Flower's fixedclipping_mod (or adaptiveclipping_mod, which also
    reports whether it clipped) clips this device's update to the norm the server sends.
    It is applied here, by config, rather than in @app.train(mods=...), which is fixed at
    import time and would fail every message without a clipping norm."""
    flower.install()  # fedrec's Flower adaptations (fedrec/federation/flower.py)
    if context.run_config.get("secagg.enabled"):
        return secagg.client_app()(msg, context)
    privacy = Config.from_flat(context.run_config).privacy
    if privacy.mode == "user":
        mod = adaptiveclipping_mod if privacy.clipping == "adaptive" else fixedclipping_mod
        return mod(msg, context, _train)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    return Message(client_round.train(msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    flower.install()
    if context.run_config.get("secagg.enabled"):
        return secagg.client_app()(msg, context)
    return Message(client_round.evaluate(msg, context), reply_to=msg)
