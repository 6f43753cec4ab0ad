"""The node index of Flower's in-memory LinkState (fedrec/federation/linkstate_index.py)
returns what Flower's own get_message_ins returns, call by call."""

import copy
import random
import time
from uuid import uuid4

import pytest
from flwr.app import Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedrec.federation import linkstate_index as li

ORIG = li.ORIGINAL


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
        assert ORIG["store_message_ins"](twin, copy.deepcopy(msg)) == msg.metadata.message_id
    return twin


def _ids(messages) -> list[str]:
    return [m.metadata.message_id for m in messages]


@pytest.fixture()
def patched(monkeypatch):
    for name in li.ORIGINAL:
        monkeypatch.setattr(InMemoryLinkState, name, getattr(li, name))


def test_get_message_ins_agrees_with_flowers_call_by_call(patched):
    rng = random.Random(0)
    state, grid, nodes = _state_and_grid(12)
    # Messages stored before the index exists are indexed on first use.
    early = Message(RecordDict(), nodes[0], "train", group_id="1")
    early.metadata.__dict__["_message_id"] = str(uuid4())  # as InMemoryGrid.push_messages does
    assert ORIG["store_message_ins"](state, early)
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
            li.delete_messages(state, gone)
            ORIG["delete_messages"](twin, gone)
            more = [Message(RecordDict(), rng.choice(nodes), "train", group_id="2")
                    for _ in range(10)]
            for m in grid.push_messages(more):
                assert ORIG["store_message_ins"](twin, copy.deepcopy(
                    state.message_ins_store[m])) == m
        got = li.get_message_ins(state, node_id=node, limit=limit)
        want = ORIG["get_message_ins"](twin, node_id=node, limit=limit)
        assert _ids(got) == _ids(want), (i, node, limit)
        assert all(m.metadata.delivered_at for m in got)
    # Each node polled at least once: the same messages remain (the original also drops
    # other nodes' expired messages as it passes them; the index drops them when polled).
    for node in nodes:
        li.get_message_ins(state, node_id=node, limit=None)
        ORIG["get_message_ins"](twin, node_id=node, limit=None)
    assert list(state.message_ins_store) == list(twin.message_ins_store)
    index = {mid for ids in li._index(state).values() for mid in ids}
    assert index == set(state.message_ins_store)


def test_install_patches_only_the_supported_flower_line(monkeypatch):
    for name in li.ORIGINAL:
        monkeypatch.setattr(InMemoryLinkState, name, li.ORIGINAL[name])
    monkeypatch.setattr(li.flwr, "__version__", "1.99.0")
    assert not li.install()
    assert InMemoryLinkState.get_message_ins is li.ORIGINAL["get_message_ins"]
    monkeypatch.setattr(li.flwr, "__version__", "1.42.0")
    assert li.install()
    assert InMemoryLinkState.get_message_ins is li.get_message_ins
