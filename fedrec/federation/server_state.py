"""What a resumed run's server needs besides the global model, in one place for both
strategies (strategy.py, the SecAgg+ one in secagg.py): FedAdam's moments and the
per-device ε table. Saved flat with every checkpoint
(``checkpoints/round-NNNN.server.safetensors``: "m_t/<array>", "v_t/<array>",
"epsilon/<node id>") and read back by FederatedRun.resume.
"""

import numpy as np

from fedrec.privacy.accounting import EPSILON_METRIC

MOMENTS = ("m_t", "v_t")  # FedOpt's server moments (Flower's FedAdam attribute names)
_EPS = "epsilon/"


def moments_from(state: dict | None) -> dict[str, dict[str, np.ndarray]]:
    """{"m_t": {array name: moment}, "v_t": ...} stored in `state`; a name is absent when
    the run had none yet."""
    out = {}
    for name in MOMENTS:
        part = {k.split("/", 1)[1]: v for k, v in (state or {}).items()
                if k.startswith(name + "/")}
        if part:
            out[name] = part
    return out


def pack(moments: dict[str, dict[str, np.ndarray] | None], epsilon: "EpsilonTable") -> dict:
    """The flat state to save: moments ({"m_t": {name: array} or None, ...}) and ε table."""
    out = {f"{name}/{k}": v for name in MOMENTS for k, v in (moments.get(name) or {}).items()}
    return {**out, **epsilon.state()}


class EpsilonTable:
    """node id -> the cumulative sample-level ε its latest train reply reported (the device's
    own accountant, fedrec/privacy/accounting.py): each round's "epsilon-max" / "epsilon-mean" cover
    every device that has trained so far, not only this round's sample.

    Restored on resume. A node id means the same device only while the SuperLink's
    database does (a deployment's registered SuperNodes); a simulation's virtual nodes get
    new ids, so `forget_absent` drops entries of nodes not connected when a resumed run
    starts, and their devices re-enter the table when they next train."""

    def __init__(self, state: dict | None = None):
        self.by_node = {int(k[len(_EPS):]): float(np.asarray(v).reshape(-1)[0])
                        for k, v in (state or {}).items() if k.startswith(_EPS)}

    def update(self, replies: list[tuple[int, dict]]) -> dict[str, float]:
        """replies: (node id, metrics) of this round's valid train replies. Returns the
        round's ε statistics (empty without sample-level DP)."""
        for node, metrics in replies:
            if EPSILON_METRIC in metrics:
                self.by_node[int(node)] = float(metrics[EPSILON_METRIC])
        if not self.by_node:
            return {}
        eps = list(self.by_node.values())
        return {"epsilon-max": max(eps), "epsilon-mean": sum(eps) / len(eps)}

    def forget_absent(self, live_nodes) -> None:
        live = {int(n) for n in live_nodes}
        self.by_node = {n: e for n, e in self.by_node.items() if n in live}

    def state(self) -> dict[str, np.ndarray]:
        return {f"{_EPS}{n}": np.full(1, e, np.float64) for n, e in self.by_node.items()}
