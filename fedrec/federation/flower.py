"""Every place fedrec adapts Flower, in one module, each with its reason and the Flower
versions it was checked against. `install()` (called by the ServerApp and the ClientApp,
never on import) puts the process-wide ones in place; on a Flower outside CHECKED it
leaves Flower as it is and logs one line. tests/test_flower.py has a test per adaptation
that fails when Flower's behaviour changes underneath it.

1. Array decoding (measured cost). Flower decodes an Array with np.load(BytesIO(data)),
   which parses the .npy header, a Python dict literal, with ast.literal_eval each time.
   The ServerApp decodes each reply several times (the reply checks, the update norm,
   the mean), and in a 943-client round py-spy found 51% of the simulation process's
   samples in Array.numpy, 20% in the header parser alone. `decode` reads the same bytes
   to the same array (a writable copy, as np.load returns), parsing each distinct header
   once; anything but a plain version 1-3 .npy of a dtype without Python objects goes to
   np.load, so what np.load refuses is still refused.
2. An index by destination node for the in-memory LinkState (measured cost). The
   Simulation Engine polls InMemoryLinkState.get_message_ins(node_id, limit=1) for every
   virtual node in turn, every 0.1 s, and each call scans every stored instruction
   message: 943 x 943 checks a sweep in a full-participation ml-100k round, which kept one
   of 2 cores busy polling (py-spy: 83% of the simulation process's samples). The index
   (kept by store_message_ins and delete_messages) makes a poll check only the node's own
   messages; what a call returns, in what order, and what it marks delivered are
   unchanged (the original's deletion of other nodes' expired messages happens when those
   nodes are polled, as every node is polled each sweep). In simulation the ServerApp and
   the engine share one process; a deployed SuperLink is not patched.
3. Seeded sampling (reproducibility). Flower's strategies sample nodes with the global
   `random`; `seeded_sampling` seeds it per (train.seed, round) for one configure call and
   restores it, so a resumed run samples what the uninterrupted one would have.
4. Balanced sampling (a participation DP can plan for). `balanced_sampling` replaces
   flwr.serverapp.strategy.fedavg.sample_nodes for one configure call with a seeded order
   of the connected devices taken k at a time in turn (it still waits for the devices as
   Flower does).
5. The task identity of an in-process run. Flower's runtimes set the class attributes of
   flwr.supercore.task_identity.TaskIdentity before a ServerApp or ClientApp runs, and
   Messages read them; the Ray-free in-process grid (inprocess.py) sets them the same way
   (`set_task_identity`).

Size: five adaptations, each with its reason, on purpose in one module.
"""

import ast
import logging
import random
from contextlib import contextmanager
from functools import lru_cache
from io import BytesIO

import flwr
import flwr.serverapp.strategy.fedavg as flower_fedavg
import numpy as np
from flwr.app import Array
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now
from flwr.supercore.task_identity import TaskIdentity

CHECKED = ("1.42.",)  # Flower lines these adaptations were written and tested against
LOG = logging.getLogger("fedrec")


def checked() -> bool:
    return flwr.__version__.startswith(CHECKED)


def install() -> bool:
    """Put adaptations 1 and 2 in place in this process (idempotent); False, leaving
    Flower as it is, on a Flower line they were not checked against."""
    if not checked():
        LOG.warning("Flower %s: fedrec's adaptations were checked against %s only; running "
                    "without them (slower simulations)", flwr.__version__, ", ".join(CHECKED))
        return False
    Array.numpy = _numpy
    for name in ORIGINAL_LINKSTATE:
        setattr(InMemoryLinkState, name, globals()[name])
    return True


# -- 1. Array decoding --------------------------------------------------------------------
MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000  # np.load's default max_header_size: a longer header goes to np.load
ORIGINAL_NUMPY = Array.numpy


@lru_cache(maxsize=256)
def _header(raw: bytes, encoding: str) -> tuple[np.dtype, bool, tuple[int, ...]] | None:
    try:
        h = ast.literal_eval(raw.decode(encoding))
    except (ValueError, SyntaxError, UnicodeDecodeError):
        return None
    if not isinstance(h, dict) or set(h) != {"descr", "fortran_order", "shape"}:
        return None
    shape = h["shape"]
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(h["fortran_order"], bool)):
        return None
    try:
        dtype = np.lib.format.descr_to_dtype(h["descr"])
    except (TypeError, ValueError):
        return None
    if dtype.hasobject:
        return None
    return dtype, h["fortran_order"], shape


def decode(data: bytes) -> np.ndarray:
    """The array np.load(BytesIO(data), allow_pickle=False) returns."""
    view = memoryview(data)
    parsed = None
    if bytes(view[:6]) == MAGIC and view[6] in (1, 2, 3) and len(view) >= 10:
        width = 2 if view[6] == 1 else 4
        start = 8 + width
        size = int.from_bytes(view[8:start], "little")
        if size <= MAX_HEADER:
            parsed = _header(bytes(view[start:start + size]), "utf8" if view[6] == 3 else "latin1")
        offset = start + size
    if parsed is None:
        return np.load(BytesIO(data), allow_pickle=False)
    dtype, fortran, shape = parsed
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - offset < count * dtype.itemsize:
        return np.load(BytesIO(data), allow_pickle=False)  # truncated: np.load's error
    flat = np.frombuffer(view, dtype, count=count, offset=offset)
    if fortran:
        return flat.reshape(shape[::-1]).transpose().copy(order="F")
    return flat.reshape(shape).copy()




def _numpy(self: Array) -> np.ndarray:
    if self.stype != "numpy.ndarray":
        return ORIGINAL_NUMPY(self)  # its error for other serialization types
    return decode(self.data)


# -- 2. LinkState index -----------------------------------------------------------------
_INDEX = "_fedrec_ins_by_dst"
ORIGINAL_LINKSTATE = {name: getattr(InMemoryLinkState, name)
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
        mid = ORIGINAL_LINKSTATE["store_message_ins"](self, message)
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
        ORIGINAL_LINKSTATE["delete_messages"](self, message_ins_ids)  # deletes every stored one
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



# -- 3. and 4. Sampling -------------------------------------------------------------------
@contextmanager
def seeded_sampling(seed: int, server_round: int):
    """Flower samples nodes with the global `random`: seed it per round, then restore it."""
    outer = random.getstate()
    random.seed(int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0]))
    try:
        yield
    finally:
        random.setstate(outer)


@contextmanager
def balanced_sampling(seed: int, server_round: int):
    """fed.sampling = "balanced": a seeded order of the connected devices, taken k at a
    time in turn (round t trains positions (t - 1) k .. t k - 1, wrapping around), so every
    device joins the same number of rounds, +-1, and none more than ceil(T k / N)."""
    flower_sample = flower_fedavg.sample_nodes

    def in_turn(grid, min_available_nodes: int, sample_size: int):
        _, nodes = flower_sample(grid, min_available_nodes, sample_size)
        ids = sorted(nodes)  # Python ints: node ids use all 64 bits, beyond numpy's int64
        order = [ids[i] for i in np.random.default_rng([seed, 1]).permutation(len(ids))]
        start = (server_round - 1) * sample_size
        return [order[(start + i) % len(order)] for i in range(sample_size)], nodes

    flower_fedavg.sample_nodes = in_turn
    try:
        yield
    finally:
        flower_fedavg.sample_nodes = flower_sample


# -- 5. Task identity ---------------------------------------------------------------------
def set_task_identity(run_id: int, node_id: int = 0, task_id: int = 0) -> None:
    """What Flower's runtimes set before an app runs (Messages read it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
