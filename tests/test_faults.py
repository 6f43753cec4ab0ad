"""Failing and poisoned clients in whole in-process runs (real ServerApp and ClientApp):
bad replies are dropped and counted in results.json, the global model is the aggregate of
the valid replies only, injected failures do not stop training, and the defences hold a
poisoned update back. Plus the fault plan itself and the device's own state files."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from safetensors.numpy import load_file

import clients.app
from fedrec.data.pipeline import prepare
from fedrec.federation.faults import FAILURE_KINDS, POISON_SCALE, corrupt, planned_fault
from fedrec.federation.inprocess import InProcessGrid
from fedrec.federation.local_store import load_local, save_local
from fedrec.federation.run_store import FederatedRun
from tiny import run_inprocess, tiny_config

REASON = {"raise": "error", "nan": "nonfinite", "shape": "shape", "keys": "keys"}


pytestmark = pytest.mark.usefixtures("isolated")


def config(tiny_root, tmp_path, **overrides):
    """FedAvg unless told otherwise: these tests check the aggregate against a plain mean."""
    return tiny_config(tiny_root, {"fed.run-dir": str(tmp_path / "run"), "fed.strategy": "fedavg",
                                   **overrides})


class Recording(InProcessGrid):
    """Keeps every (request, reply) pair; `lost` nodes' train replies never arrive."""

    def __init__(self, *args, lost=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs, self.lost, self.timeouts = [], set(lost), set()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.timeouts.add(timeout)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        # (the strategy reuses one ConfigRecord: read the round now, not later)
        self.pairs += [(m.metadata.message_type, int(m.content["config"]["server-round"]), m, r)
                       for m, r in zip(messages, replies)]
        return [r for m, r in zip(messages, replies)
                if not (m.metadata.message_type == "train" and m.metadata.dst_node_id in self.lost)]

    def train_pairs(self, rnd):
        return [(m, r) for kind, at, m, r in self.pairs if kind == "train" and at == rnd]


# ------------------------------------------------------------------ the plan, the store

def test_the_fault_plan_is_deterministic_and_near_the_rate():
    plan = [planned_fault(0, c, r, 0.3, "mixed", 0.0) for r in range(1, 41) for c in range(50)]
    assert plan == [planned_fault(0, c, r, 0.3, "mixed", 0.0)
                    for r in range(1, 41) for c in range(50)]
    assert abs(sum(p is not None for p in plan) / len(plan) - 0.3) < 0.02
    assert {p for p in plan if p} == set(FAILURE_KINDS)
    other = [planned_fault(1, c, r, 0.3, "mixed", 0.0) for r in range(1, 41) for c in range(50)]
    assert other != plan  # another seed fails other clients
    # attackers stay attackers: the same clients in every round
    poisoned = [{c for c in range(200) if planned_fault(0, c, r, 0.0, "raise", 0.05)}
                for r in (1, 2, 3)]
    assert poisoned[0] == poisoned[1] == poisoned[2] and 3 <= len(poisoned[0]) <= 20
    assert planned_fault(0, 1, 1, 0.0, "raise", 0.0) is None


def test_corrupt_makes_each_kind_of_bad_upload():
    sent = {"a.w": np.ones((3, 2), np.float32), "a.b": np.zeros(2, np.float32)}
    params = {k: v + 0.5 for k, v in sent.items()}
    assert np.isnan(corrupt("nan", sent, params)["a.w"]).any()
    assert np.isinf(corrupt("nan", sent, params)["a.b"]).any()
    assert corrupt("shape", sent, params)["a.w"].shape == (2, 2)
    assert set(corrupt("keys", sent, params)) == {"a.w.renamed", "a.b"}
    poison = corrupt("poison", sent, params)
    np.testing.assert_allclose(poison["a.w"] - sent["a.w"], POISON_SCALE * 0.5)
    assert poison["a.w"].dtype == np.float32
    np.testing.assert_array_equal(params["a.w"], sent["a.w"] + 0.5)  # the input is untouched


def test_local_store_keeps_the_two_newest_and_loads_from_before_a_round(tmp_path):
    from types import SimpleNamespace

    from fedrec.federation.local_store import device_dir

    cfg = tiny_config(tmp_path, {"fed.run-dir": str(tmp_path / "run")})
    ctx = SimpleNamespace(node_config={"data-dir": str(tmp_path / "dev")})
    d = device_dir(ctx, cfg, 5, simulated=True)
    assert d == tmp_path / "run" / "devices" / "5"
    for rnd in (1, 3, 4, 7):
        save_local(d, rnd, {"user": np.full(4, rnd, np.float32)})
    assert sorted(p.name for p in d.iterdir()) == ["round-0004.safetensors", "round-0007.safetensors"]
    assert load_local(d, before_round=7)["user"][0] == 4
    assert load_local(d, before_round=8)["user"][0] == 7
    assert load_local(d, before_round=4) is None
    assert load_local(device_dir(ctx, cfg, 6, True), before_round=9) is None  # another device
    save_local(d, 2, {"user": np.full(4, 2, np.float32)})  # a new run: later rounds are stale
    assert sorted(p.name for p in d.iterdir()) == ["round-0002.safetensors"]
    real = device_dir(ctx, cfg, 5, simulated=False)  # a real device: its own data-dir
    assert real.parent == tmp_path / "dev" / "state"
    other = device_dir(ctx, cfg.override(**{"fed.run-dir": str(tmp_path / "b")}), 5, False)
    assert other.parent == real.parent and other != real  # one directory per run
    assert device_dir(ctx, cfg.override(**{"fed.run-dir": ""}), 5, True) is None


# ------------------------------------------------------------------ whole runs

def misbehaving(kinds: dict[int, str], bad_eval: set[int] = frozenset()):
    """The real ClientApp, except that node n answers train with fault kinds[n], and the
    nodes in bad_eval report a NaN metric from evaluation."""
    def app(msg: Message, ctx):
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if kind == "train" and kinds.get(node) == "raise":
            raise RuntimeError("device crashed")
        reply = clients.app.app(msg, ctx)
        if kind == "train" and node in kinds:
            sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            got = {k: a.numpy() for k, a in reply.content["arrays"].items()}
            bad = corrupt(kinds[node], sent, got)
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
        if kind == "evaluate" and node in bad_eval:
            metrics = dict(reply.content["metrics"])
            reply = Message(RecordDict({"metrics": MetricRecord(
                {**metrics, "sampled/hr@10": float("nan")})}), reply_to=msg)
        return reply
    return app


def test_bad_clients_are_dropped_counted_and_never_aggregated(tiny_root, tmp_path):
    cfg = config(tiny_root, tmp_path, **{"fed.num-rounds": 2, "fed.clients-per-round": 0,
                                         "fed.round-timeout": 123.0})
    n = prepare(cfg).split.n_users
    kinds = {1: "raise", 2: "nan", 3: "shape", 4: "keys"}
    lost = {6}  # its reply never arrives (a timeout)
    grid = Recording(misbehaving(kinds, bad_eval={5}), cfg.to_flat(), n, lost=lost)
    grid, results = run_inprocess(cfg, grid)

    assert results["status"] == "completed"
    assert grid.timeouts == {123.0}  # fed.round-timeout reaches every send_and_receive
    rounds = {r["round"]: r for r in results["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    for rnd in (1, 2):
        t = rounds[rnd]["train"]
        assert t["clients"] == n - 5 and t["failures"] == 5 and t["kept-previous"] == 0
        assert {r: t[f"failures/{r}"] for r in ("error", "nonfinite", "shape", "keys", "timeout",
                                                "malformed")} == {
            "error": 1, "nonfinite": 1, "shape": 1, "keys": 1, "timeout": 1, "malformed": 0}
        e = rounds[rnd]["evaluate"]
        assert (e["clients"], e["failures"], e["failures/nonfinite"]) == (n - 1, 1, 1)
        assert rounds[rnd]["federated"]["users"] == n - 2  # minus the NaN one and the light one
        assert np.isfinite(rounds[rnd]["federated"]["sampled/hr@10"])

        # the global model is exactly the weighted mean of the valid replies
        valid = [r for m, r in grid.train_pairs(rnd)
                 if m.metadata.dst_node_id not in kinds.keys() | lost]
        assert len(valid) == n - 5
        w = np.array([float(r.content["metrics"]["num-examples"]) for r in valid])
        ckpt = load_file(str(tmp_path / "run" / "checkpoints" / f"round-{rnd:04d}.safetensors"))
        for k, got in ckpt.items():
            want = sum(wi / w.sum() * r.content["arrays"][k].numpy() for wi, r in zip(w, valid))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert all(np.isfinite(a).all() for a in load_file(
        str(tmp_path / "run" / "final.safetensors")).values())


def test_training_goes_on_with_30_percent_injected_failures(tiny_root, tmp_path):
    cfg = config(tiny_root, tmp_path, **{"fed.failure-rate": 0.3, "fed.failure-kind": "mixed"})
    n = prepare(cfg).split.n_users
    grid, results = run_inprocess(cfg, Recording(clients.app.app, cfg.to_flat(), n))
    rounds = {r["round"]: r for r in results["rounds"]}
    assert results["status"] == "completed" and sorted(rounds) == list(range(7))

    # exactly the planned failures happened, each counted under its reason
    planned = {r: 0 for r in REASON.values()}
    for rnd in range(1, 7):
        sampled = [m.metadata.dst_node_id - 1 for m, _ in grid.train_pairs(rnd)]
        plan = [planned_fault(cfg.train.seed, c, rnd, 0.3, "mixed", 0.0) for c in sampled]
        t = rounds[rnd]["train"]
        assert t["failures"] == sum(p is not None for p in plan)
        assert t["clients"] == len(sampled) - t["failures"]
        for p in filter(None, plan):
            planned[REASON[p]] += 1
    counted = {r: sum(rounds[k]["train"][f"failures/{r}"] for k in range(1, 7)) for r in planned}
    assert counted == planned and sum(planned.values()) >= 6
    assert sum(v > 0 for v in planned.values()) >= 3  # "mixed" mixes

    # and the model still learns (the same bar as the failure-free run in test_clientapp)
    initial = rounds[0]["server"]["sampled/hr@10"]
    best = rounds[results["summary"]["best_round"]]
    assert best["server"]["sampled/hr@10"] >= initial + 0.15, (initial, best["server"])


def movement(run_dir, initial):
    got = load_file(str(run_dir / "checkpoints" / "round-0001.safetensors"))
    return float(np.sqrt(sum(((got[k] - initial[k]) ** 2).sum() for k in got)))


def test_poisoned_clients_move_fedavg_but_not_the_defences(tiny_root, tmp_path):
    base = {"fed.num-rounds": 1, "fed.clients-per-round": 0, "fed.eval-every": 1}
    clean_cfg = config(tiny_root, tmp_path / "clean", **base)
    n = prepare(clean_cfg).split.n_users
    rate = 0.15
    attackers = [c for c in range(n) if planned_fault(0, c, 1, 0.0, "raise", rate)]
    assert 1 <= len(attackers) <= n // 4, attackers  # a minority of the 13 (seed 0)

    def run(name, **over):
        cfg = config(tiny_root, tmp_path / name, **base, **over)
        run_inprocess(cfg)
        return tmp_path / name / "run"

    initial = {k: v.numpy() for k, v in
               FederatedRun(clean_cfg, log=lambda *_: None).initial_arrays().items()}
    clean = movement(run("clean"), initial)
    poisoned = movement(run("fedavg", **{"fed.poison-rate": rate}), initial)
    assert poisoned > 20 * clean, (clean, poisoned)

    bound = 2 * clean
    bounded_dir = run("bounded", **{"fed.poison-rate": rate, "fed.max-update-norm": bound})
    assert movement(bounded_dir, initial) <= bound * (1 + 1e-5)
    assert movement(bounded_dir, initial) < 3 * clean

    median_clean = movement(run("median-clean", **{"fed.strategy": "fedmedian"}), initial)
    median = run("median", **{"fed.strategy": "fedmedian", "fed.poison-rate": rate})
    trimmed = run("trimmed", **{"fed.strategy": "fedtrimmedavg", "fed.poison-rate": rate,
                                "fed.trim-beta": 0.2})
    for d in (median, trimmed):
        assert movement(d, initial) < 3 * max(clean, median_clean), d.name
