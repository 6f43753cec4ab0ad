"""fedrec's Flower adaptations (fedrec/federation/flower.py): one test per adaptation, each
failing when Flower's behaviour changes underneath it, and install() refusing a Flower
line it was not checked against."""

import copy
import random
import time
from io import BytesIO
from uuid import uuid4

import flwr.serverapp.strategy.fedavg as flower_fedavg
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedrec.federation import flower
from fedrec.federation.flower import ORIGINAL_LINKSTATE

pytestmark = pytest.mark.usefixtures("isolated")  # Flower's task identity restored after each


def test_install_puts_the_adaptations_in_place_only_on_a_checked_flower(monkeypatch):
    monkeypatch.setattr(Array, "numpy", flower.ORIGINAL_NUMPY)
    for name, original in ORIGINAL_LINKSTATE.items():
        monkeypatch.setattr(InMemoryLinkState, name, original)
    said = []
    monkeypatch.setattr(flower.LOG, "warning", lambda msg, *args: said.append(msg % args))
    monkeypatch.setattr(flower.flwr, "__version__", "1.99.0")
    assert not flower.install()
    assert len(said) == 1 and "Flower 1.99.0: fedrec's adaptations were checked against 1.42." \
        in said[0]
    assert Array.numpy is flower.ORIGINAL_NUMPY
    assert InMemoryLinkState.get_message_ins is ORIGINAL_LINKSTATE["get_message_ins"]
    monkeypatch.setattr(flower.flwr, "__version__", "1.42.0")
    assert flower.install()
    assert InMemoryLinkState.get_message_ins is flower.get_message_ins
    a = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    assert Array(a).numpy().tobytes() == a.tobytes()


# -- 1. Array decoding -------------------------------------------------------------------
def npy(a: np.ndarray, version=None) -> bytes:
    buf = BytesIO()
    if version is None:
        np.save(buf, a, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, a, version=version, allow_pickle=False)
    return buf.getvalue()


CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    np.array(3.5, dtype=np.float32),
    np.zeros((0, 64), np.float32),
    np.arange(5, dtype=">i8"),
    np.array([True, False]),
    np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),
]


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype}-{a.shape}")
@pytest.mark.parametrize("version", [None, (2, 0), (3, 0)])
def test_decode_matches_np_load(a, version):
    data = npy(a, version)
    want = np.load(BytesIO(data), allow_pickle=False)
    got = flower.decode(data)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
    assert got.tobytes() == want.tobytes()


def test_what_np_load_refuses_is_still_refused():
    with pytest.raises(ValueError):  # pickled objects
        flower.decode(_object_npy())
    with pytest.raises(ValueError):  # truncated data
        flower.decode(npy(np.arange(10, dtype=np.float32))[:-4])
    with pytest.raises(ValueError):
        flower.decode(b"not an npy file at all")


def _object_npy() -> bytes:
    buf = BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_flowers_own_array_numpy_still_decodes_what_decode_does():
    """Adaptation 1 replaces Array.numpy: Flower's original must still serialise arrays as
    .npy bytes that decode to the same array (else the replacement reads something else)."""
    for a in CASES[:5]:
        arr = Array(a)
        assert arr.stype == "numpy.ndarray"
        want = flower.ORIGINAL_NUMPY(arr)
        got = flower.decode(arr.data)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


# -- 2. LinkState index ------------------------------------------------------------------

def _state_and_grid(nodes: int):
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1  # the SuperLink's (as a ServerApp's)
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    node_ids = list(_register_nodes(nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, node_ids


def _twin(state: InMemoryLinkState) -> InMemoryLinkState:
    """A second state with the same run, nodes and stored messages (same ids, same order),
    stored through Flower's original method."""
    twin = InMemoryLinkState(state.federation_manager, state.object_store)
    twin.run_ids, twin.nodes, twin.task_store = (dict(state.run_ids), dict(state.nodes),
                                                 dict(state.task_store))
    for msg in state.message_ins_store.values():
        assert ORIGINAL_LINKSTATE["store_message_ins"](twin, copy.deepcopy(msg)) == msg.metadata.message_id
    return twin


def _ids(messages) -> list[str]:
    return [m.metadata.message_id for m in messages]


@pytest.fixture()
def patched(monkeypatch):
    for name in flower.ORIGINAL_LINKSTATE:
        monkeypatch.setattr(InMemoryLinkState, name, getattr(flower, name))


def test_get_message_ins_agrees_with_flowers_call_by_call(patched):
    rng = random.Random(0)
    state, grid, nodes = _state_and_grid(12)
    # Messages stored before the index exists are indexed on first use.
    early = Message(RecordDict(), nodes[0], "train", group_id="1")
    early.metadata.__dict__["_message_id"] = str(uuid4())  # as InMemoryGrid.push_messages does
    assert ORIGINAL_LINKSTATE["store_message_ins"](state, early)
    msgs = [Message(RecordDict(), rng.choice(nodes), "train", group_id="1",
                    ttl=0.2 if i % 7 == 0 else None) for i in range(40)]  # some expire soon
    grid.push_messages(msgs)
    twin = _twin(state)
    assert len(state.message_ins_store) == 41
    time.sleep(0.25)
    calls = [(rng.choice(nodes), rng.choice([1, None, 2])) for _ in range(80)]
    for i, (node, limit) in enumerate(calls):
        if i == 40:  # the server pulls replies and deletes some instructions
            gone = set(rng.sample(sorted(state.message_ins_store), 5))
            flower.delete_messages(state, gone)
            ORIGINAL_LINKSTATE["delete_messages"](twin, gone)
            more = [Message(RecordDict(), rng.choice(nodes), "train", group_id="2")
                    for _ in range(10)]
            for m in grid.push_messages(more):
                assert ORIGINAL_LINKSTATE["store_message_ins"](twin, copy.deepcopy(
                    state.message_ins_store[m])) == m
        got = flower.get_message_ins(state, node_id=node, limit=limit)
        want = ORIGINAL_LINKSTATE["get_message_ins"](twin, node_id=node, limit=limit)
        assert _ids(got) == _ids(want), (i, node, limit)
        assert all(m.metadata.delivered_at for m in got)
    # Each node polled at least once: the same messages remain (the original also drops
    # other nodes' expired messages as it passes them; the index drops them when polled).
    for node in nodes:
        flower.get_message_ins(state, node_id=node, limit=None)
        ORIGINAL_LINKSTATE["get_message_ins"](twin, node_id=node, limit=None)
    assert list(state.message_ins_store) == list(twin.message_ins_store)
    index = {mid for ids in flower._index(state).values() for mid in ids}
    assert index == set(state.message_ins_store)


# -- 3. and 4. Sampling ------------------------------------------------------------------
class Nodes:
    """A grid of ten connected nodes, for Flower's own sampling."""

    def __init__(self, ids=None):
        self.ids = ids or [100 + i for i in range(10)]

    def get_node_ids(self):
        return list(self.ids)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)


def _sampled(server_round: int, seed: int = 0, balanced: bool = False) -> list[int]:
    strategy = FedAvg(fraction_train=1e-9, min_train_nodes=4, min_available_nodes=10)
    with flower.seeded_sampling(seed, server_round), (
            flower.balanced_sampling(seed, server_round) if balanced else _nothing()):
        msgs = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), Nodes())
    return [m.metadata.dst_node_id for m in msgs]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_seeded_sampling_makes_flowers_sample_a_function_of_seed_and_round():
    """Flower's FedAvg samples with the global `random`: seeding it for one call repeats
    the sample, other rounds and seeds sample others, and the outer state is restored."""
    state = random.getstate()
    assert _sampled(1) == _sampled(1) and len(set(_sampled(1))) == 4
    assert _sampled(2) != _sampled(1) and _sampled(1, seed=1) != _sampled(1)
    assert random.getstate() == state


def test_balanced_sampling_keeps_64_bit_node_ids_and_takes_each_device_in_turn():
    """Flower's node ids use all 64 bits (a SuperLink's are random); the balanced order
    must hand back exactly those ids, k at a time, each once per pass over the devices."""
    grid = Nodes([2**64 - 1 - 7 * i for i in range(5)] + [2**62 + 3 * i for i in range(5)])
    ids, seen = set(grid.get_node_ids()), []
    for rnd in range(1, 6):  # 5 rounds of 4 of 10 devices: two passes
        with flower.balanced_sampling(seed=3, server_round=rnd):
            picked, nodes = flower_fedavg.sample_nodes(grid, 10, 4)
        assert set(nodes) == ids and len(set(picked)) == 4 and set(picked) <= ids
        seen += picked
    assert seen[:10] != sorted(seen[:10])  # a seeded order, not the sorted one
    assert sorted(seen[:10]) == sorted(ids) == sorted(seen[10:])
    assert flower_fedavg.sample_nodes.__name__ == "sample_nodes"  # Flower's own, restored
    # and Flower's configure_train samples through it
    firsts = [_sampled(r, balanced=True) for r in (1, 2)]
    assert len(set(firsts[0] + firsts[1])) == 8


# -- 5. Task identity --------------------------------------------------------------------
def test_messages_read_the_task_identity_set_for_an_in_process_run(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, None)
    with pytest.raises(RuntimeError):
        Message(RecordDict(), dst_node_id=3, message_type="train")
    flower.set_task_identity(run_id=5)
    msg = Message(RecordDict(), dst_node_id=3, message_type="train")
    assert msg.metadata.run_id == 5 and msg.metadata.dst_node_id == 3
