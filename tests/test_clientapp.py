"""The Flower ClientApp with hand-built Messages, and whole runs of the real ServerApp and
ClientApp in one process (InProcessGrid, no Ray): what a reply holds, and what it must not."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.numpy import load_file

import clients.app
import server.app
from fedrec.data.pipeline import prepare
from fedrec.federation.inprocess import InProcessGrid
from fedrec.models.build import build_model
from fedrec.models.protocol import batch_inputs
from tiny import holding, tiny_config

EVAL_KEYS = {"sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10", "full/cold/hr@10",
             "new-items/hr@10", "top10/unreleased-share",
             "num-examples"}


pytestmark = pytest.mark.usefixtures("isolated")


def global_state(cfg, prepared, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, prepared.item_emb.shape[1], prepared.split.n_items).state_dict()


def message(kind, state, server_round=1, node=7):
    content = RecordDict({"arrays": ArrayRecord(state),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=node, message_type=kind)


def context(cfg, user, n_users, node=7):
    return Context(run_id=1, node_id=node, state=RecordDict(), run_config=cfg.to_flat(),
                   node_config={"partition-id": user, "num-partitions": n_users})


def test_train_reply_holds_the_federated_parameters_and_num_examples(cfg, prepared):
    n = prepared.split.n_users
    state = global_state(cfg, prepared)
    ctx = context(cfg, 0, n)
    msg = message("train", state)
    reply = clients.app.app(msg, ctx)
    assert not reply.has_error()
    assert reply.metadata.message_type == "train"
    assert reply.metadata.dst_node_id == msg.metadata.src_node_id  # back to the server
    assert set(reply.content) == {"arrays", "metrics"}
    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
    assert not reply.content.config_records
    arrays = reply.content["arrays"]
    assert list(arrays) == list(state)  # exactly the model's parameters, in order
    assert all(arrays[k].shape == tuple(v.shape) for k, v in state.items())
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(prepared.split.history(0))
    assert np.isfinite(metrics["train-loss"])
    assert "user-local" not in ctx.state  # the seq model reads the user from the history


def test_a_user_local_vector_stays_in_context_state_across_rounds(tiny_root):
    cfg = tiny_config(tiny_root, {"model.kind": "fedmf"})
    p = prepare(cfg)
    state = global_state(cfg, p)
    ctx = context(cfg, 0, p.split.n_users)
    reply = clients.app.app(message("train", state), ctx)
    user = ctx.state["user-local"]["user"].numpy()
    assert user.shape == (cfg.model.dim,) and np.abs(user).max() > 0
    # round 2 starts from the stored user-local state and replaces it
    reply2 = clients.app.app(message("train", reply.content["arrays"].to_torch_state_dict(), 2),
                             ctx)
    assert list(reply2.content["arrays"]) == list(state)
    assert not np.array_equal(ctx.state["user-local"]["user"].numpy(), user)


@pytest.mark.parametrize("kind", ["seq", "fedmf"])
@pytest.mark.parametrize("user", [0, 1])
def test_train_reply_carries_no_plm_no_user_vector_no_user_local_state(tiny_root, user, kind):
    from transformers import AutoModel

    cfg = tiny_config(tiny_root, {"model.kind": kind})
    prepared = prepare(cfg)
    E = prepare(tiny_config(tiny_root)).item_emb  # the PLM's output, even where unused
    split = prepared.split
    state = global_state(cfg, prepared)
    ctx = context(cfg, user, split.n_users)
    reply = clients.app.app(message("train", state), ctx)
    sent = {k: v.numpy() for k, v in state.items()}
    got = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    update = {k: got[k] - sent[k] for k in got}

    # 1. no PLM weight: no name, no shape of its embedding tables, no equal tensor
    plm = {k: v.numpy() for k, v in AutoModel.from_pretrained(cfg.encoder.model_dir)
           .state_dict().items()}
    assert not set(got) & set(plm)
    vocab, hidden = plm["embeddings.word_embeddings.weight"].shape
    assert hidden == E.shape[1]
    tables = {w.shape for n, w in plm.items() if n.endswith("embeddings.weight")}
    for k, a in got.items():
        assert vocab not in a.shape and a.shape not in tables, k
        for n, w in plm.items():
            assert not (a.shape == w.shape and np.allclose(a, w)), (k, n)
    assert sum(a.size for a in got.values()) < sum(w.size for w in plm.values())
    # nor the PLM's output, the item text embeddings
    for row in E[split.history(user)]:
        assert not holding(got, row)

    # 2. no user-local state, neither as a value nor as an update
    local = None
    if kind == "fedmf":
        local = ctx.state["user-local"]["user"].numpy()
        assert np.abs(local).max() > 1e-4  # it trained, so a copy would be visible
        assert not holding(got, local), "user-local vector in the reply"
        assert not holding(update, local), "user-local update in the reply"
    else:
        assert "user-local" not in ctx.state

    # 3. no user vector h_u (the device's own)
    model = build_model(cfg, prepared.item_emb.shape[1], split.n_items).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()})
    with torch.no_grad():
        hu = model.user_vectors(torch.from_numpy(prepared.item_emb),
                                batch_inputs([split.history(user)], model.max_len),
                                None if local is None else torch.from_numpy(local)[None])[0]
    hu = hu[0].numpy()
    assert np.abs(hu).max() > 1e-3
    assert not holding(got, hu) and not holding(update, hu)


def test_evaluate_reply_has_the_metric_keys(cfg, prepared):
    split = prepared.split
    state = global_state(cfg, prepared)
    light = int(np.flatnonzero(split.test < 0)[0])
    replies = {}
    for user in (0, 1, light):
        reply = clients.app.app(message("evaluate", state), context(cfg, user, split.n_users))
        assert not reply.has_error()
        assert set(reply.content) == {"metrics"} and not reply.content.array_records
        replies[user] = dict(reply.content["metrics"])
    for user, m in replies.items():
        assert EVAL_KEYS <= set(m)
        assert set(m) == set(replies[0])  # every device reports the same keys
        assert m["num-examples"] == (0 if user == light else 1)
    assert all(0.0 <= v <= 1.0 for v in replies[0].values())


def test_evaluate_uses_the_stored_user_local_state(tiny_root):
    """A user-local vector pointing at the test item puts it first; pointing away, last."""
    cfg = tiny_config(tiny_root, {"model.kind": "fedmf"})
    prepared = prepare(cfg)
    split, E = prepared.split, prepared.item_emb
    user = 2
    state = global_state(cfg, prepared)
    model = build_model(cfg, E.shape[1], split.n_items)
    model.load_state_dict(state)
    t = int(split.test[user])
    with torch.no_grad():
        h_t = model.item_table(torch.from_numpy(E), torch.tensor([t]))[0][0].numpy()
    toward = 1e3 * h_t / np.linalg.norm(h_t)
    metrics = {}
    for name, vec in (("toward", toward), ("away", -toward)):
        ctx = context(cfg, user, split.n_users)
        ctx.state["user-local"] = ArrayRecord({"user": Array(vec.astype(np.float32))})
        reply = clients.app.app(message("evaluate", state), ctx)
        metrics[name] = dict(reply.content["metrics"])
        stored = ctx.state["user-local"]["user"].numpy()
        np.testing.assert_array_equal(stored, vec.astype(np.float32))  # read, not replaced
    assert metrics["toward"]["sampled/hr@10"] == 1.0 and metrics["toward"]["sampled/ndcg@10"] > 0.6
    assert metrics["away"]["sampled/hr@10"] == 0.0 and metrics["away"]["full/hr@10"] == 0.0
    fresh = context(cfg, user, split.n_users)
    clients.app.app(message("evaluate", state), fresh)
    assert "user-local" not in fresh.state  # evaluation never creates local state


def run_federated(cfg, tmp_path, seed):
    """The real ServerApp main + ClientApp, in this process; returns (run dir, calls)."""
    cfg = cfg.override(**{"train.seed": seed, "fed.run-dir": str(tmp_path / "run")})
    flat = cfg.to_flat()
    n_users = prepare(cfg).split.n_users
    grid = InProcessGrid(clients.app.app, flat, n_users)
    calls = []
    call = grid._call

    def recording(msg):
        calls.append((msg.metadata.message_type, int(msg.content["config"]["server-round"]),
                      msg.metadata.dst_node_id))
        return call(msg)

    grid._call = recording
    server.app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=flat))
    return cfg, tmp_path / "run", calls, grid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_process_federated_run_learns(cfg, tmp_path, seed):
    cfg, run_dir, calls, grid = run_federated(cfg, tmp_path, seed)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = {r["round"]: r for r in results["rounds"]}
    R, k = cfg.fed.num_rounds, cfg.fed.clients_per_round
    n_users = len(grid.contexts)
    assert sorted(rounds) == list(range(R + 1))

    # every round trains exactly fed.clients-per-round distinct devices, all succeed
    for r in range(1, R + 1):
        trained = [node for kind, rnd, node in calls if kind == "train" and rnd == r]
        assert len(trained) == len(set(trained)) == k
        assert rounds[r]["train"]["clients"] == k and rounds[r]["train"]["failures"] == 0
        evaluated = [node for kind, rnd, node in calls if kind == "evaluate" and rnd == r]
        assert sorted(evaluated) == sorted(grid.contexts)  # every device evaluates
        assert rounds[r]["federated"]["users"] == n_users - 1  # all but the train-only one
    assert not [c for c in grid.contexts.values() if "user-local" in c.state]

    # the global parameters change between rounds, and only federated ones are saved
    first = load_file(str(run_dir / "checkpoints" / "round-0001.safetensors"))
    final = load_file(str(run_dir / "final.safetensors"))
    assert set(first) == set(final) == set(global_state(cfg, prepare(cfg)))
    assert any(not np.array_equal(first[k], final[k]) for k in first)
    np.testing.assert_array_equal(
        final[next(iter(final))],
        load_file(str(run_dir / "checkpoints" / f"round-{R:04d}.safetensors"))[next(iter(final))])

    # and the model learns: the round chosen by validation beats the initial model (server,
    # round 0) clearly, and the last round still beats it. NDCG: with the validation item
    # in the test input the untrained model already hits for most of the 12 users.
    key = "sampled/ndcg@10"
    initial = rounds[0]["server"][key]
    best, last = rounds[results["summary"]["best_round"]], rounds[R]
    assert best["server"][key] >= initial + 0.1, (initial, best["server"])
    assert best["federated"][key] >= initial + 0.1, (initial, best["federated"])
    assert last["server"][key] > initial, (initial, last["server"])
    assert last["federated"][key] > initial, (initial, last["federated"])
    assert results["summary"]["final_round"] == R


@pytest.mark.parametrize("seed", [0, 1])
def test_in_process_federated_fedmf_learns_on_the_devices(tiny_root, tmp_path, seed):
    """FedMF: h_u is each device's own user-local vector. The server has no user vectors,
    so only the devices evaluate (no "server" record)."""
    from fedrec.data.protocol import ClientData
    from fedrec.federation.local import client_seed, local_evaluate

    cfg, run_dir, calls, grid = run_federated(
        tiny_config(tiny_root, {"model.kind": "fedmf", "train.lr": 0.05}), tmp_path, seed)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = {r["round"]: r for r in results["rounds"]}
    R = cfg.fed.num_rounds
    assert sorted(rounds) == list(range(1, R + 1))
    assert not [r for r in rounds.values() if "server" in r]
    assert all(rounds[r]["train"]["clients"] == cfg.fed.clients_per_round for r in rounds)
    trained_ever = {node for kind, _, node in calls if kind == "train"}
    assert {n for n, c in grid.contexts.items() if "user-local" in c.state} == trained_ever
    final = load_file(str(run_dir / "final.safetensors"))
    p = prepare(cfg)
    assert set(final) == set(global_state(cfg, p)) == {"item_emb.weight", "item_bias.weight"}

    # the initial model as a device evaluates it before it ever trained: the initial
    # global parameters and a fresh (random) user-local vector
    start = {k: v.numpy() for k, v in global_state(cfg, p, seed=seed).items()}
    users = [u for u in range(p.split.n_users) if p.split.test[u] >= 0]
    initial = np.mean([local_evaluate(cfg, p.item_emb, ClientData.from_split(p.split, u), start,
                                      None, client_seed(cfg, u, 1))["sampled/hr@10"]
                       for u in users])
    best, last = rounds[results["summary"]["best_round"]]["federated"], rounds[R]["federated"]
    assert best["sampled/hr@10"] >= initial + 0.15, (initial, best)
    assert last["sampled/hr@10"] > initial, (initial, last)
