"""A device's round without Flower: what leaves it, what stays, and how metrics combine."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedrec.data.evaluate import evaluate
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.federation.client_round import load_client
from fedrec.federation.local import (
    aggregate_client_metrics,
    client_seed,
    local_evaluate,
    local_update,
)
from fedrec.models.build import build_model
from fedrec.models.train import scorer
from tiny import holding, tiny_config

KEYS = ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10", "full/cold/hr@10",
        "full/warm/ndcg@10", "sampled/cold/hr@10", "new-items/hr@10", "top10/unreleased-share")


pytestmark = pytest.mark.usefixtures("isolated")


def global_arrays(cfg, E, n_items, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, E.shape[1], n_items)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["seq", "fedmf"])
def test_local_update_returns_exactly_the_federated_parameters(tiny_root, kind):
    cfg = tiny_config(tiny_root, {"model.kind": kind})
    p = prepare(cfg)
    E, split = p.item_emb, p.split
    start = global_arrays(cfg, E, split.n_items)
    model = build_model(cfg, E.shape[1], split.n_items)
    params, local, metrics = local_update(cfg, E, ClientData.from_split(split, 0), start, None,
                                          seed=1)
    sd = model.state_dict()
    assert list(params) == list(sd)  # same names, same order: what FedAvg averages
    assert {k: v.shape for k, v in params.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert all(v.dtype == np.float32 for v in params.values())
    assert any(not np.array_equal(params[k], start[k]) for k in params)  # it trained
    assert metrics["num-examples"] == len(split.history(0))
    if kind == "seq":  # it reads the user from the history: no user-local state
        assert local == {}
        return
    # the user-local vector is returned separately and appears in no federated array
    user = local["user"]
    assert user.shape == (cfg.model.dim,) and np.abs(user).max() > 1e-4
    assert "user" not in params
    assert holding(params, user) == []
    assert holding({k: params[k] - start[k] for k in params}, user) == []  # nor as an update


def test_user_local_state_round_trips(tiny_root):
    cfg = tiny_config(tiny_root, {"model.kind": "fedmf", "train.optimizer": "sgd"})
    p = prepare(cfg)
    E, data = p.item_emb, ClientData.from_split(p.split, 3)
    start = global_arrays(cfg, E, p.split.n_items)
    _, first, _ = local_update(cfg, E, data, start, None, seed=1)
    fresh = first["user"].copy()
    # A second call with a (practically) frozen optimizer returns the state it was given:
    # it starts from the returned local state, not from a new initialisation.
    still = cfg.override(**{"train.lr": 1e-9})
    _, second, _ = local_update(still, E, data, start, first, seed=2)
    np.testing.assert_allclose(second["user"], fresh, atol=1e-6)
    np.testing.assert_array_equal(first["user"], fresh)  # the input was not modified
    _, restart, _ = local_update(still, E, data, start, None, seed=2)
    assert np.abs(restart["user"] - fresh).max() > 1e-3  # a fresh start looks different


def test_fedprox_keeps_the_update_closer_to_the_global_model(cfg, prepared):
    cfg = cfg.override(**{"train.local-epochs": 5})
    E, data = prepared.item_emb, ClientData.from_split(prepared.split, 0)
    start = global_arrays(cfg, E, prepared.split.n_items)

    def drift(mu):
        params, _, _ = local_update(cfg, E, data, start, None, seed=3, proximal_mu=mu)
        return math.sqrt(sum(float(((params[k] - start[k]) ** 2).sum()) for k in start))

    d0, d_small, d_big = drift(0.0), drift(0.1), drift(1.0)
    assert d0 > 0
    assert d_big < d_small < d0
    assert d_big < 0.5 * d0
    assert drift(0.0) == d0  # same seed, same update: the comparison is fair


def test_local_evaluate_reports_the_same_keys_for_every_client(cfg, prepared):
    split, E = prepared.split, prepared.item_emb
    arrays = global_arrays(cfg, E, split.n_items)
    clients = [ClientData.from_split(split, u) for u in range(split.n_users)]
    clients.append(dataclasses.replace(clients[0], val=-1, test=-1))   # too short a history
    clients.append(dataclasses.replace(clients[1], history=np.zeros(0, np.int64)))  # all cold
    records = [local_evaluate(cfg, E, c, arrays, None, seed=0) for c in clients]
    keys = set(records[0])
    assert all(set(r) == keys for r in records)
    assert keys >= {*KEYS, "num-examples", "val/sampled/hr@10", "cold/users", "warm/users"}
    light = [u for u in range(split.n_users) if split.test[u] < 0]
    assert light, "the tiny data has a train-only user"
    for u in light + [len(clients) - 2, len(clients) - 1]:
        assert records[u]["num-examples"] == 0
    for r in records:
        assert r["num-examples"] in (0, 1)
        assert all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in r.values())
        assert r["sampled/hr@10"] in (0.0, 1.0) and r["cold/users"] + r["warm/users"] <= 1.0


def test_devices_rank_exactly_like_the_server(cfg, prepared):
    """Mean of the devices' own metrics = the server-side protocol on the same model."""
    split, E = prepared.split, prepared.item_emb
    arrays = global_arrays(cfg, E, split.n_items, seed=5)
    records = [local_evaluate(cfg, E, ClientData.from_split(split, u), arrays, None, seed=0)
               for u in range(split.n_users)]
    fed = aggregate_client_metrics(records)
    model = build_model(cfg, E.shape[1], split.n_items, split.released)  # as devices know
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    for stage, prefix in (("test", ""), ("val", "val/")):
        server = evaluate(scorer(model, torch.from_numpy(E)), split, stage)
        for key in ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10"):
            assert fed[prefix + key] == pytest.approx(server[key], abs=1e-6), prefix + key
        if stage == "test":
            assert fed["users"] == server["users"]
            assert fed["cold/users"] == server["cold/users"] >= 1  # the tiny data has one
            for key in KEYS[4:] + ("full/cold/ndcg@10", "new-items/ndcg@10",
                                   "sampled/warm/hr@10"):
                assert fed[key] == pytest.approx(server[key], abs=1e-6), key


def record(hr, ndcg, cold, n=1):
    out = {"num-examples": n, "sampled/hr@10": hr, "sampled/ndcg@10": ndcg,
           "full/hr@10": hr / 2, "full/ndcg@10": ndcg / 2}
    out["cold/users"], out["warm/users"] = float(cold), 1.0 - cold
    for group, flag in (("cold", cold), ("warm", 1 - cold)):
        out[f"full/{group}/hr@10"], out[f"full/{group}/ndcg@10"] = flag * hr, flag * ndcg
    out["new-items/hr@10"] = cold * 1.0
    out["top10/unreleased-share"] = 0.1 * cold
    return out


def test_aggregate_client_metrics_by_hand():
    records = [record(1.0, 1.0, cold=0), record(1.0, 0.5, cold=1), record(0.0, 0.0, cold=0),
               record(1.0, 0.25, cold=0), {**record(1.0, 1.0, cold=1, n=0)}]  # last: ignored
    out = aggregate_client_metrics(records)
    assert out["users"] == 4.0
    assert out["sampled/hr@10"] == pytest.approx(3 / 4)
    assert out["sampled/ndcg@10"] == pytest.approx((1 + 0.5 + 0 + 0.25) / 4)
    assert out["full/hr@10"] == pytest.approx(3 / 8)
    assert out["cold/users"] == 1.0 and out["warm/users"] == 3.0
    assert out["full/cold/hr@10"] == pytest.approx(1.0)
    assert out["full/cold/ndcg@10"] == pytest.approx(0.5)
    assert out["full/warm/hr@10"] == pytest.approx(2 / 3)
    assert out["full/warm/ndcg@10"] == pytest.approx(1.25 / 3)
    assert out["new-items/hr@10"] == 1.0  # over the cold devices only
    assert out["top10/unreleased-share"] == pytest.approx(0.1 / 4)  # over every device
    assert "num-examples" not in out


def test_aggregate_client_metrics_edge_cases():
    assert aggregate_client_metrics([]) == {}
    assert aggregate_client_metrics([record(1.0, 1.0, cold=0, n=0)]) == {}
    out = aggregate_client_metrics([record(1.0, 1.0, cold=0)])
    assert out["cold/users"] == 0.0  # no cold user: NaN
    assert math.isnan(out["full/cold/hr@10"]) and math.isnan(out["new-items/hr@10"])
    assert out["full/warm/hr@10"] == 1.0


def test_a_simulated_client_loads_its_users_partition(cfg, prepared):
    def ctx(user):
        return Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_flat(),
                       node_config={"partition-id": user, "num-partitions": 13})

    got_cfg, E, data, user, simulated = load_client(ctx(4))
    assert got_cfg == cfg and user == 4 and simulated
    np.testing.assert_array_equal(E, prepared.item_emb)
    np.testing.assert_array_equal(data.history, prepared.split.history(4))
    assert data.test == prepared.split.test[4] and data.n_items == prepared.split.n_items
    assert load_client(ctx(5))[1] is E  # one population per process
    n = prepared.split.n_users
    with pytest.raises(ValueError, match=f"partition-id {n} outside 0..{n - 1}"):
        load_client(ctx(n))


def test_client_seed_is_deterministic_and_distinct(cfg):
    seeds = {(u, r): client_seed(cfg, u, r) for u in range(5) for r in range(1, 4)}
    assert len(set(seeds.values())) == len(seeds)
    assert client_seed(cfg, 2, 3) == seeds[(2, 3)]
    assert all(isinstance(s, int) for s in seeds.values())
