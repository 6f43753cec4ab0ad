"""An index by destination node for Flower's in-memory LinkState, as the simulation uses it.

Flower 1.42's Simulation Engine polls `InMemoryLinkState.get_message_ins(node_id, limit=1)`
for every virtual node in turn, every 0.1 s (flwr/server/superlink/fleet/vce/vce_api.py,
`add_messages_to_queue`), and each call scans *every* stored instruction message, checking
each one's expiry and federation. With one virtual node per user and a round's messages in
the store, a sweep is nodes x messages checks: 943 x 943 in a full-participation ml-100k
round, which kept one of 2 cores busy polling while the ClientApp actors waited for CPU
(py-spy: 83% of the simulation process's samples in that loop).

`install()` gives the class an index from destination node to its messages (in storage
order), kept by `store_message_ins` and `delete_messages`, so `get_message_ins` checks only
the polled node's own messages. What a call returns, in what order, and what it marks
delivered are unchanged; the original's one side effect on *other* nodes' messages (it
deletes the expired ones it passes) happens when those nodes are polled, as the engine
polls every node each sweep. tests/test_linkstate_index.py checks the patched and the
original methods agree call by call on the same stored messages.

The ServerApp module installs it (server/app.py): in simulation the ServerApp and the
engine share one process and one LinkState. A deployed SuperLink runs in its own process
and is not patched.
"""

import flwr
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

SUPPORTED = "1.42."  # the Flower line this was written against (pyproject pins it)
_INDEX = "_fedrec_ins_by_dst"
ORIGINAL = {name: getattr(InMemoryLinkState, name)
            for name in ("store_message_ins", "delete_messages", "get_message_ins")}


def _index(state: InMemoryLinkState) -> dict[int, dict[str, None]]:
    """{dst node: {message id: None}} in storage order (dicts as ordered sets); built from
    the store on first use, so messages stored before install() are indexed too."""
    idx = state.__dict__.get(_INDEX)
    if idx is None:
        idx = {}
        for mid, msg in state.message_ins_store.items():
            idx.setdefault(msg.metadata.dst_node_id, {})[mid] = None
        state.__dict__[_INDEX] = idx
    return idx


def store_message_ins(self, message):
    with self.lock:
        mid = ORIGINAL["store_message_ins"](self, message)
        if mid is not None and mid in self.message_ins_store:
            _index(self).setdefault(self.message_ins_store[mid].metadata.dst_node_id, {})[mid] = None
        return mid


def delete_messages(self, message_ins_ids: set[str]) -> None:
    if not message_ins_ids:
        return
    with self.lock:
        idx = _index(self)
        dst = {mid: m.metadata.dst_node_id for mid in message_ins_ids
               if (m := self.message_ins_store.get(mid)) is not None}
        ORIGINAL["delete_messages"](self, message_ins_ids)  # deletes every stored one
        for mid, node in dst.items():
            del idx[node][mid]
            if not idx[node]:
                del idx[node]


def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None):
    """InMemoryLinkState.get_message_ins over node_id's own messages only."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found = []
    with self.lock:
        for mid in list(_index(self).get(node_id, ())):
            self._check_stored_messages({mid})  # may delete it (expired, left the federation)
            msg = self.message_ins_store.get(mid)
            if (msg and (run_id is None or msg.metadata.run_id == run_id)
                    and msg.metadata.delivered_at == ""):
                found.append(msg)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg in found:
        msg.metadata.delivered_at = delivered_at
    return found


def install() -> bool:
    """Patch InMemoryLinkState (idempotent); False, leaving Flower as it is, on a Flower
    line this was not checked against."""
    if not flwr.__version__.startswith(SUPPORTED):
        return False
    for name in ORIGINAL:
        setattr(InMemoryLinkState, name, globals()[name])
    return True
