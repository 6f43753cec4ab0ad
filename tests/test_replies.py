"""The server's reply checks and defences, on hand-built Messages: every kind of bad reply
is dropped and counted, the global model is the aggregate of the valid ones only, and a
poisoned update is bounded by norm clipping and ignored by the median."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.config import Config, load_defaults
from fedrec.federation.inprocess import InProcessGrid
from fedrec.federation.replies import (
    REASONS,
    bound_update,
    evaluate_problem,
    filter_replies,
    train_problem,
)
from fedrec.federation.strategy import Recording

SENT = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.zeros(2, np.float32)}
N = 6  # devices in the strategy tests


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # process-global: restore afterwards
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def request(node=1, kind="train"):
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                          "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=node, message_type=kind)


def reply(arrays=None, metrics=None, node=1, **records):
    """A train reply: arrays (default: SENT + node) and metrics (default: num-examples node)."""
    arrays = {k: v + node for k, v in SENT.items()} if arrays is None else arrays
    metrics = {"num-examples": node, "train-loss": 0.5} if metrics is None else metrics
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics), **records})
    return Message(content, reply_to=request(node))


def error_reply(node=1):
    return Message(Error(code=100, reason="boom"), reply_to=request(node))


BAD_TRAIN = {
    "error": lambda: error_reply(),
    "no arrays": lambda: Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                                 reply_to=request()),
    "two array records": lambda: reply(extra=ArrayRecord({"x": Array(np.zeros(1))})),
    "no metrics": lambda: Message(RecordDict({"arrays": ArrayRecord(
        {k: Array(v) for k, v in SENT.items()})}), reply_to=request()),
    "no num-examples": lambda: reply(metrics={"train-loss": 0.5}),
    "zero num-examples": lambda: reply(metrics={"num-examples": 0, "train-loss": 0.5}),
    "list metric": lambda: reply(metrics={"num-examples": 1, "train-loss": [0.5, 0.4]}),
    "nan metric": lambda: reply(metrics={"num-examples": 1, "train-loss": float("nan")}),
    "inf metric": lambda: reply(metrics={"num-examples": 1, "train-loss": float("inf")}),
    "nan epsilon": lambda: reply(metrics={"num-examples": 1, "epsilon": float("nan")}),
    "-inf epsilon": lambda: reply(metrics={"num-examples": 1, "epsilon": -float("inf")}),
    "missing key": lambda: reply(arrays={"w": SENT["w"]}),
    "renamed key": lambda: reply(arrays={"w": SENT["w"], "bias": SENT["b"]}),
    "extra key": lambda: reply(arrays={**SENT, "x": np.zeros(1, np.float32)}),
    "wrong shape": lambda: reply(arrays={"w": SENT["w"][:2], "b": SENT["b"]}),
    "transposed": lambda: reply(arrays={"w": SENT["w"].T.copy(), "b": SENT["b"]}),
    "nan": lambda: reply(arrays={"w": np.where(SENT["w"] == 3, np.nan, SENT["w"]), "b": SENT["b"]}),
    "inf": lambda: reply(arrays={"w": SENT["w"], "b": np.array([0, -np.inf], np.float32)}),
}
WHY = {"error": "error", "no arrays": "malformed", "two array records": "malformed",
       "no metrics": "malformed", "no num-examples": "malformed", "zero num-examples": "malformed",
       "list metric": "malformed", "nan metric": "nonfinite", "inf metric": "nonfinite",
       "nan epsilon": "nonfinite", "-inf epsilon": "nonfinite", "missing key": "keys",
       "renamed key": "keys", "extra key": "keys", "wrong shape": "shape", "transposed": "shape",
       "nan": "nonfinite", "inf": "nonfinite"}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_each_bad_train_reply_is_named(case):
    assert train_problem(BAD_TRAIN[case](), SENT) == WHY[case]


def test_a_good_train_reply_passes():
    assert train_problem(reply(), SENT) is None
    # DP-SGD without noise (clipping only): the device's ε is +inf, said as such, not dropped
    assert train_problem(reply(metrics={"num-examples": 1, "epsilon": float("inf")}), SENT) is None
    assert train_problem(reply(arrays={k: v.astype(np.float64) for k, v in SENT.items()}),
                         SENT) is None  # FedAdam-style float64 is still a model


def test_evaluate_replies():
    ok = Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "hr": 0.0})}),
                 reply_to=request(kind="evaluate"))
    assert evaluate_problem(ok) is None  # a device without a test item reports 0 examples
    for metrics, why in (({"hr": 1.0}, "malformed"), ({"num-examples": -1, "hr": 1.0}, "malformed"),
                         ({"num-examples": 1, "hr": float("inf")}, "nonfinite")):
        bad = Message(RecordDict({"metrics": MetricRecord(metrics)}),
                      reply_to=request(kind="evaluate"))
        assert evaluate_problem(bad) == why
    assert evaluate_problem(error_reply()) == "error"
    assert evaluate_problem(reply()) == "malformed"  # arrays have no place in an evaluation


def test_filter_counts_every_reason_timeouts_and_odd_metric_keys():
    replies = [reply(node=n) for n in (1, 2, 3)] + [BAD_TRAIN[c]() for c in sorted(BAD_TRAIN)]
    odd = reply(node=4, metrics={"num-examples": 4, "loss": 0.5})  # valid alone, odd key set
    valid, failures = filter_replies(replies + [odd], expected=len(replies) + 3,
                                     problem=lambda m: train_problem(m, SENT))
    assert [m.content["metrics"]["num-examples"] for m in valid] == [1, 2, 3]
    assert set(failures) == set(REASONS)
    expected = {r: sum(w == r for w in WHY.values()) for r in REASONS}
    expected["malformed"] += 1  # the odd key set
    expected["timeout"] = 2  # two of the messages sent got no reply
    assert failures == expected


def test_bound_update_clips_to_the_norm_and_keeps_small_updates():
    big = reply(arrays={"w": SENT["w"] + 3.0, "b": SENT["b"] + 4.0})
    norm = bound_update(big, SENT, max_norm=1.0)
    assert norm == pytest.approx(np.sqrt(6 * 9 + 2 * 16))
    got = {k: a.numpy() for k, a in big.content["arrays"].items()}
    delta = np.concatenate([(got[k] - SENT[k]).ravel() for k in SENT])
    assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(got["w"] - SENT["w"], 3.0 / norm, rtol=1e-5)  # same direction
    assert got["w"].dtype == np.float32
    small = reply(arrays={"w": SENT["w"] + 0.1, "b": SENT["b"]})
    before = small.content["arrays"]["w"].numpy().copy()
    assert bound_update(small, SENT, max_norm=1.0) < 1.0
    np.testing.assert_array_equal(small.content["arrays"]["w"].numpy(), before)


# --------------------------------------------------------------------------- strategy

class FakeRun:
    """What the strategy tells the run: train records and the checkpointed arrays."""

    def __init__(self):
        self.train, self.kept, self.records = {}, {}, {}

    def is_eval_round(self, rnd):
        return True

    def on_train(self, rnd, arrays, metrics, server_state=None):
        self.train[rnd] = metrics
        self.kept[rnd] = {k: (a.numpy() if isinstance(a, Array) else a) for k, a in arrays.items()}

    def record(self, rnd, key, metrics):
        self.records[(rnd, key)] = dict(metrics)


def strategy(**overrides):
    """FedAvg unless told otherwise: the tests compare the aggregate with a plain mean."""
    cfg = Config.from_flat({**load_defaults(), "fed.clients-per-round": N, "fed.strategy": "fedavg",
                            **overrides})
    run = FakeRun()
    s = Recording(cfg, run, population=N)
    grid = InProcessGrid(None, cfg.to_flat(), N)
    sent = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    messages = s.configure_train(1, sent, ConfigRecord(), grid)
    assert len(messages) == N
    return s, run


def aggregate(s, replies):
    arrays, metrics = s.aggregate_train(1, replies)
    return (None if arrays is None else {k: a.numpy() for k, a in arrays.items()}), metrics


def weighted_mean(replies):
    w = np.array([float(m.content["metrics"]["num-examples"]) for m in replies])
    return {k: sum(wi / w.sum() * m.content["arrays"][k].numpy() for wi, m in zip(w, replies))
            for k in SENT}


def test_bad_replies_never_reach_the_aggregate():
    s, run = strategy()
    good = [reply(node=n) for n in (1, 2)]
    expected = weighted_mean(good)
    bad = [BAD_TRAIN[c]() for c in ("error", "nan", "wrong shape", "renamed key")]
    arrays, metrics = aggregate(s, [bad[0], good[0], *bad[1:], good[1]])
    for k in SENT:
        np.testing.assert_allclose(arrays[k], expected[k], rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(0.5)
    t = run.train[1]
    assert (t["clients"], t["failures"], t["kept-previous"]) == (2, 4, 0)
    assert t["update-norm-median"] == pytest.approx(1.5 * np.sqrt(8))  # updates of 1s and 2s
    assert t["update-norm-max"] == pytest.approx(2 * np.sqrt(8)) and "clipped" not in t
    assert (t["failures/error"], t["failures/nonfinite"], t["failures/shape"],
            t["failures/keys"], t["failures/timeout"]) == (1, 1, 1, 1, 0)
    np.testing.assert_allclose(run.kept[1]["w"], expected["w"], rtol=1e-6)


def test_too_few_valid_replies_keep_the_previous_model():
    s, run = strategy(**{"fed.min-replies": 2})
    arrays, metrics = aggregate(s, [reply(node=1), BAD_TRAIN["nan"](), error_reply(3)])
    assert arrays is None and metrics is None
    assert run.train[1]["kept-previous"] == 1 and run.train[1]["clients"] == 1
    assert run.train[1]["failures/timeout"] == N - 3
    for k, sent in SENT.items():  # the round's checkpoint is the model that was sent
        np.testing.assert_array_equal(run.kept[1][k], sent)
    s, run = strategy()
    assert aggregate(s, [error_reply(n) for n in range(1, N + 1)]) == (None, None)
    assert run.train[1]["failures/error"] == N


def honest_and_poisoned():
    """Five honest updates near +1 and one sign-flipped, 1000x boosted update."""
    rng = np.random.default_rng(0)
    honest = [reply(arrays={k: v + 1 + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                            for k, v in SENT.items()}, node=n,
                    metrics={"num-examples": 10, "train-loss": 0.5}) for n in range(1, 6)]
    poisoned = reply(arrays={k: v - 1000.0 for k, v in SENT.items()}, node=6,
                     metrics={"num-examples": 10, "train-loss": 0.5})
    return honest, poisoned


def moved(arrays):
    return float(np.sqrt(sum(((arrays[k] - SENT[k]) ** 2).sum() for k in SENT)))


@pytest.mark.parametrize("defence,limit", [
    ({"fed.strategy": "fedavg"}, None),
    ({"fed.strategy": "fedavg", "fed.max-update-norm": 3.0}, 3.0),
    ({"fed.strategy": "fedmedian"}, None),
    ({"fed.strategy": "fedtrimmedavg", "fed.trim-beta": 0.2}, None),
])
def test_a_poisoned_update_moves_plain_fedavg_but_not_the_defences(defence, limit):
    honest, poisoned = honest_and_poisoned()
    clean_s, _ = strategy(**{"fed.strategy": "fedavg"})
    clean = moved(aggregate(clean_s, honest_and_poisoned()[0])[0])
    assert clean == pytest.approx(np.sqrt(8), rel=0.05)  # every coordinate moved by ~1
    s, run = strategy(**defence)
    arrays, _ = aggregate(s, [*honest, poisoned])
    if defence == {"fed.strategy": "fedavg"}:
        assert moved(arrays) > 100 * clean  # one attacker in six drags the model far away
        return
    assert moved(arrays) <= 1.5 * clean, defence
    if limit:  # every update clipped to the bound: the mean moves at most that far
        assert moved(arrays) <= limit + 1e-5
        assert run.train[1]["clipped"] == 1  # only the attacker (honest norms ~2.8)


def test_fedadam_takes_the_configured_server_lr_and_tau():
    """Adam's first step is eta sqrt(1 - b2^2) / (1 - b1^2) m / (sqrt(v) + tau) per value,
    about eta_norm sign(update) when tau is small against the update (~1 here); Flower's
    default tau = 1e-3 stalls training on mean updates of ~1e-4 per value, so the
    config's tau must reach the step."""
    norm = 0.02 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    for tau, want in ((1e-7, norm), (1e3, norm * 0.1 / (0.1 + 1e3))):
        s, _ = strategy(**{"fed.strategy": "fedadam", "fed.server-lr": 0.02,
                           "fed.server-tau": tau, "fed.server-lr-warmup": 0})
        arrays, _ = aggregate(s, honest_and_poisoned()[0])
        step = np.abs(arrays["w"].astype(np.float64) - SENT["w"])
        np.testing.assert_allclose(step, want, rtol=0.05)


def test_more_clients_per_round_than_users_is_one_clear_config_error():
    from fedrec.errors import FedrecError

    with pytest.raises(FedrecError, match=r"'fed.clients-per-round' must be <= the 6 users"):
        strategy(**{"fed.clients-per-round": N + 1})


def test_server_lr_warms_up_linearly_then_decays_along_a_cosine():
    from fedrec.federation.server_opt import server_lr

    cfg = Config.from_flat({**load_defaults(), "fed.num-rounds": 20, "fed.server-lr": 0.03,
                            "fed.server-lr-warmup": 4, "fed.server-lr-decay": "cosine"})
    lrs = [server_lr(cfg, r) for r in range(1, 21)]
    assert lrs[:5] == pytest.approx([0.0075, 0.015, 0.0225, 0.03, 0.03])
    assert (np.diff(lrs[4:]) < 0).all()  # falls every round after warmup
    assert lrs[-1] == pytest.approx(0.03 * 0.5 * (1 + np.cos(np.pi * 15 / 16)))
    flat = cfg.override(**{"fed.server-lr-warmup": 0, "fed.server-lr-decay": "none"})
    assert {server_lr(flat, r) for r in range(1, 21)} == {0.03}


def test_fedadam_steps_with_the_scheduled_server_lr():
    """Round 1 of a 4-round warmup takes a quarter of the step of a run without one
    (Adam's first step is eta_norm * sign(update) per value), and the round records it."""
    steps = {}
    for warmup in (0, 4):
        s, run = strategy(**{"fed.strategy": "fedadam", "fed.server-lr": 0.02,
                             "fed.server-lr-warmup": warmup})
        arrays, _ = aggregate(s, honest_and_poisoned()[0])
        steps[warmup] = moved(arrays)
        assert run.train[1]["server-lr"] == pytest.approx(0.02 / (warmup or 1))
    assert steps[4] == pytest.approx(steps[0] / 4, rel=1e-6)


def test_fedadam_scales_the_step_of_the_id_tables_only(monkeypatch):
    """fed.server-lr-ids multiplies FedAdam's step of the per-item ID tables (the seq
    model's id_emb / id_bias) and leaves every other array's step as it was."""
    monkeypatch.setitem(SENT, "id_emb.weight", np.ones((4, 2), np.float32))
    steps = {}
    for scale in (1.0, 3.0):
        s, _ = strategy(**{"fed.strategy": "fedadam", "fed.server-lr-ids": scale})
        arrays, _ = aggregate(s, honest_and_poisoned()[0])
        steps[scale] = {k: arrays[k].astype(np.float64) - SENT[k] for k in SENT}
    assert np.abs(steps[1.0]["id_emb.weight"]).min() > 0
    np.testing.assert_allclose(steps[3.0]["id_emb.weight"], 3 * steps[1.0]["id_emb.weight"],
                               rtol=1e-4)  # float32 values near 1
    for k in ("w", "b"):
        np.testing.assert_array_equal(steps[3.0][k], steps[1.0][k])
