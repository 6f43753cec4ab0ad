"""Secure aggregation (fedrec/federation/secagg.py): SecAgg+ aggregates what plain FedAvg aggregates
on the same client updates, up to quantisation error; the server's view of a device is
masked; dropouts, client-side clipping + DP noise and the ε budget work under it; bad
settings are refused with one line. The last test runs a real `flwr run`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Error, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from safetensors.numpy import load_file

import clients.app
from fedrec.config import Config, load_config, load_defaults
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.errors import FedrecError
from fedrec.federation import secagg
from fedrec.federation.inprocess import InProcessGrid
from fedrec.federation.local import client_seed, local_update
from fedrec.federation.server_opt import BETA_1, BETA_2, server_lr
from fedrec.models.build import build_model, id_tables
from tiny import Killed, run_inprocess, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")
# Named, so a changed default strategy doesn't matter. FedAdam's step is compared up to
# quantisation, which needs a tau far above the quantisation error: with tau -> 0 Adam's
# first step is sign(mean update), and an error of 1e-6 on a near-zero value flips it.
FEDAVG = {"fed.strategy": "fedavg", "fed.server-tau": 1e-3}
USER_DP = {"privacy.mode": "user", "privacy.noise-multiplier": 0.0,
           "privacy.max-grad-norm": 0.05}  # small enough that every update is clipped
SAMPLE_DP = {"privacy.mode": "sample", "privacy.noise-multiplier": 1.0}


class Grid(InProcessGrid):
    """Records the train replies the server receives; `fail(msg)` True: that node's
    reply is an error instead (a device dropping out at that point)."""

    def __init__(self, *args, fail=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail, self.train_replies = fail, []

    def _call(self, msg: Message) -> Message:
        if self.fail and self.fail(msg):
            return Message(Error(code=1, reason="device went offline"), reply_to=msg)
        reply = super()._call(msg)
        if msg.metadata.message_type == "train":
            self.train_replies.append(reply)
        return reply


def _run(root, tmp_path, name, fail=None, **overrides):
    """One in-process run of the real apps (every user, one round by default): (cfg,
    grid, results.json, the global arrays after round 1)."""
    cfg = tiny_config(root, {**FEDAVG, "fed.clients-per-round": 0, "fed.num-rounds": 1,
                             "fed.run-dir": str(tmp_path / name), **overrides})
    grid = Grid(clients.app.app, cfg.to_flat(), prepare(cfg).split.n_users, fail=fail)
    _, results = run_inprocess(cfg, grid)
    return cfg, grid, results, load_file(str(tmp_path / name / "checkpoints" /
                                             "round-0001.safetensors"))


def quantisation_bound(cfg: Config, weights: np.ndarray, max_weight: float) -> float:
    """Worst-case error per value of the securely aggregated mean: each device's value is
    scaled by w / max_weight and stochastically rounded (error < one level, 2r / levels)."""
    step = 2 * cfg.secagg.clipping_range / cfg.secagg.quantization_range
    return len(weights) * step / float(np.sum(weights / max_weight))


def _round(results: dict, rnd: int) -> dict:
    return next(r for r in results["rounds"] if r["round"] == rnd)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def _initial(cfg: Config) -> dict:
    p = prepare(cfg)
    torch.manual_seed(cfg.train.seed)  # as FederatedRun.initial_arrays
    model = build_model(cfg, p.item_emb.shape[1], p.split.n_items)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def adam_gain(cfg: Config, rnd: int = 1) -> float:
    """Largest factor by which the FedAdam step (first moments from zero) scales an error
    in the mean update: eta_norm (1 - beta_1) / tau."""
    eta_norm = server_lr(cfg, rnd) * np.sqrt(1 - BETA_2 ** (rnd + 1.0)) / (1 - BETA_1 ** (rnd + 1.0))
    return float(eta_norm * (1 - BETA_1) / cfg.fed.server_tau)


@pytest.mark.parametrize("mode,strategy", [
    ("none", "fedavg"), ("user", "fedavg"), ("sample", "fedavg"),
    ("none", "fedprox"), ("none", "fedadam"), ("user", "fedadam")])
def test_secagg_aggregates_what_fedavg_aggregates(tiny_root, tmp_path, monkeypatch, mode,
                                                  strategy):
    """The same round as without SecAgg, up to quantisation: FedAvg (plain, or over
    updates clipped on the devices, or DP-SGD ones), FedProx, and FedAdam's step on the
    securely aggregated mean. DP-SGD's noise comes from the operating system's entropy on
    a device; here it is replayed from a fixed seed so that both runs draw the same."""
    monkeypatch.setattr("fedrec.federation.local.secret_randomness", lambda: (
        np.random.default_rng(0), torch.Generator().manual_seed(0)))
    extra = {"none": {}, "user": USER_DP, "sample": SAMPLE_DP}[mode]
    extra = {**extra, "fed.strategy": strategy}
    if strategy == "fedadam":  # ID tables too, whose step fed.server-lr-ids scales
        extra["model.id-embeddings"] = True
    cfg, _, plain, want = _run(tiny_root, tmp_path, "plain", **extra)
    cfg_sa, grid, res, got = _run(tiny_root, tmp_path, "secagg", **extra,
                                  **{"secagg.enabled": True})
    split = prepare(cfg).split
    lengths = np.diff(split.train_ptr).astype(float)
    weights, max_w = (lengths, lengths.max()) if mode == "none" else (np.ones(len(lengths)), 1.0)
    bound = quantisation_bound(cfg_sa, weights, max_w)
    gain = {k: 1.0 for k in want}  # per array: how much the server's step scales an error
    if strategy == "fedadam":
        bound *= adam_gain(cfg)
        gain = {k: cfg.fed.server_lr_ids if k.startswith(id_tables(cfg)) else 1.0 for k in want}
        assert max(gain.values()) == cfg.fed.server_lr_ids > 1  # the scaled step is covered
    assert want.keys() == got.keys()
    err = {k: float(np.abs(want[k].astype(np.float64) - got[k]).max()) for k in want}
    print(f"\n{mode}/{strategy}: max |secagg - plain| / gain = "
          f"{max(e / gain[k] for k, e in err.items()):.2e}, bound {bound:.2e}, level "
          f"{2 * cfg_sa.secagg.clipping_range / cfg_sa.secagg.quantization_range:.2e}")
    assert _max_diff(want, _initial(cfg)) > 100 * bound  # the round did move the model
    for k, e in err.items():  # + float32 rounding of the parameters
        assert e <= gain[k] * bound + 1e-6, k
    assert secagg.max_weight(cfg_sa, SimpleNamespace(deployed=False, prepared=prepare(cfg))) \
        == max_w

    assert res["status"] == "completed" and res["config"]["secagg.enabled"] is True
    r1, p1 = _round(res, 1), _round(plain, 1)
    assert (r1["train"]["clients"], r1["train"]["failures"], r1["train"]["kept-previous"]) \
        == (split.n_users, 0, 0)
    assert "federated" in r1 and "server" in r1 and r1["evaluate"]["failures"] == 0
    if mode == "none":  # the mean training loss is aggregated securely too
        assert r1["train"]["train-loss"] == pytest.approx(p1["train"]["train-loss"], abs=1e-4)
    else:
        assert "train-loss" not in r1["train"]
        assert r1["train"]["epsilon-max"] == p1["train"]["epsilon-max"]
    assert (tmp_path / "secagg" / "final.safetensors").is_file()
    assert (tmp_path / "secagg" / "metrics.csv").is_file()

    # What the server received from each device in the train rounds: keys, ciphertexts,
    # shares and one masked vector of integers mod 2**32; no update, no weight in the clear.
    assert len(grid.train_replies) == 4 * split.n_users  # four SecAgg+ stages
    masked = 0
    for reply in grid.train_replies:
        content = reply.content
        assert all(len(rec) == 0 for rec in content.array_records.values())
        if "fitres.num_examples" in content.metric_records:
            masked += 1
            assert content.metric_records["fitres.num_examples"]["num_examples"] == 0
            assert set(content.config_records["fitres.metrics"]) <= {"epsilon"}
            vec = [bytes_to_ndarray(b)
                   for b in content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            assert all(v.dtype.kind in "iu" and v.min() >= 0 and v.max() < 2**32 for v in vec)
    assert masked == split.n_users


def test_a_device_dropping_after_key_sharing_is_left_out(tiny_root, tmp_path):
    """Node 4 (user 3) drops before sending its masked vector: the server removes its
    pairwise masks from its neighbours' shares and aggregates the other 12, as FedAvg does
    when that device fails its round."""
    def plain_fail(msg):
        return msg.metadata.dst_node_id == 4 and msg.metadata.message_type == "train"

    def secagg_fail(msg):
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        return msg.metadata.dst_node_id == 4 and cfg.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS

    cfg, _, plain, want = _run(tiny_root, tmp_path, "plain", fail=plain_fail)
    _, _, res, got = _run(tiny_root, tmp_path, "secagg", fail=secagg_fail,
                          **{"secagg.enabled": True})
    assert _round(plain, 1)["train"]["clients"] == _round(res, 1)["train"]["clients"] == 12
    assert _round(res, 1)["train"]["failures"] == 1
    lengths = np.diff(prepare(cfg).split.train_ptr).astype(float)
    assert _max_diff(want, got) <= quantisation_bound(cfg, np.delete(lengths, 3),
                                                      lengths.max()) + 1e-6


def test_a_killed_secagg_fedadam_run_resumes_with_its_moments(tiny_root, tmp_path):
    """Killed in round 2 while collecting masked vectors, resumed from round 1's
    checkpoint and FedAdam moments: round 2's first moments come out as an uninterrupted
    run's, up to quantisation (each run rounds its own rounds stochastically), and far
    from those of a resume that lost the moments (which starts Adam afresh)."""
    over = {"secagg.enabled": True, "fed.strategy": "fedadam", "fed.num-rounds": 2}
    cfg, _, whole, _ = _run(tiny_root, tmp_path, "whole", **over)
    n = prepare(cfg).split.n_users
    diffs = {}
    for keep in (True, False):
        name, sent = f"killed-{keep}", {"train": 0}

        def die(msg, sent=sent):  # 4 SecAgg+ stages of n messages a round; die in stage 3
            sent["train"] += msg.metadata.message_type == "train"
            if sent["train"] > 4 * n + 2 * n + 3:
                raise Killed()
            return False

        with pytest.raises(Killed):
            _run(tiny_root, tmp_path, name, fail=die, **over)
        moments = tmp_path / name / "checkpoints" / "round-0001.server.safetensors"
        assert moments.is_file()
        if not keep:
            moments.unlink()
        _, _, res, _ = _run(tiny_root, tmp_path, name, **over, **{"fed.resume": True})
        assert res["status"] == "completed"
        assert [r["round"] for r in res["rounds"] if "train" in r] == [1, 2]
        assert _round(res, 2)["train"]["clients"] == _round(whole, 2)["train"]["clients"] == n
        got, want = (load_file(str(tmp_path / d / "checkpoints" / "round-0002.server.safetensors"))
                     for d in (name, "whole"))
        m = [k for k in want if k.startswith("m_t/")]
        diffs[keep] = (np.sqrt(sum(np.sum((got[k] - want[k]) ** 2) for k in m))
                       / np.sqrt(sum(np.sum(want[k] ** 2) for k in m)))
    assert diffs[True] < 0.1 and diffs[False] > 0.5, diffs


def test_user_level_dp_noise_is_added_to_the_masked_mean(tiny_root, tmp_path):
    sigma = 0.5
    cfg, _, _, clean = _run(tiny_root, tmp_path, "plain", **USER_DP)
    _, _, res, noisy = _run(tiny_root, tmp_path, "secagg", **{
        **USER_DP, "secagg.enabled": True, "privacy.noise-multiplier": sigma})
    n = prepare(cfg).split.n_users
    diff = np.concatenate([(noisy[k].astype(np.float64) - clean[k]).ravel() for k in clean])
    want = sigma * cfg.privacy.max_grad_norm / n  # DP-FedAvg: sigma C / k on the mean
    assert diff.std() == pytest.approx(want, rel=0.1)
    assert abs(diff.mean()) < 5 * want / np.sqrt(diff.size)
    assert 0 < _round(res, 1)["train"]["epsilon-max"] < np.inf


def test_privacy_budget_stops_before_the_round_that_would_exceed_it(tiny_root, tmp_path):
    from fedrec.privacy.accounting import user_epsilon

    cfg = tiny_config(tiny_root, {**FEDAVG, **USER_DP, "privacy.noise-multiplier": 1.0})
    eps1, eps2 = user_epsilon(cfg, 1, 1.0), user_epsilon(cfg, 2, 1.0)
    _, _, res, _ = _run(tiny_root, tmp_path, "secagg", **{
        **USER_DP, "secagg.enabled": True, "privacy.noise-multiplier": 1.0,
        "privacy.target-epsilon": (eps1 + eps2) / 2, "fed.num-rounds": 3})
    assert res["status"] == "stopped" and "privacy budget exhausted: round 2" in res["stopped"]
    assert [r["round"] for r in res["rounds"] if "train" in r] == [1]


@pytest.mark.parametrize("key,value,match", [
    ("secagg.num-shares", 4, r"'secagg.num-shares' must be odd and >= 3 .*; got 4"),
    ("secagg.num-shares", 1, r"'secagg.num-shares' must be odd and >= 3"),
    ("secagg.reconstruction-threshold", 3,
     r"'secagg.reconstruction-threshold' must be >= 2 and < secagg.num-shares \(3\); got 3"),
    ("secagg.reconstruction-threshold", 1, r"'secagg.reconstruction-threshold' must be >= 2"),
    ("secagg.clipping-range", 0.0, r"'secagg.clipping-range' must be > 0"),
    ("secagg.quantization-range", 2**32, r"'secagg.quantization-range' must be in \[2, 2\*\*32\)"),
    ("secagg.enabled", 1, r"'secagg.enabled' must be bool"),
])
def test_bad_secagg_config_is_refused_with_one_line(key, value, match):
    with pytest.raises(FedrecError, match=match) as exc:
        load_config({key: value})
    assert "\n" not in str(exc.value)


def test_secagg_defaults_are_off_and_valid():
    cfg = Config.from_flat(load_defaults())
    assert not cfg.secagg.enabled and cfg.secagg.num_shares % 2 == 1
    secagg.check(cfg.override(**{**FEDAVG, "secagg.enabled": True}), k=94, population=943)
    assert load_config({"secagg.num-shares": 5, "secagg.reconstruction-threshold": 4})


@pytest.mark.parametrize("overrides,k,match", [
    ({"fed.strategy": "fedmedian"}, 94, "needs fed.strategy fedavg, fedprox or fedadam"),
    ({"fed.max-update-norm": 1.0}, 94, "set fed.max-update-norm = 0"),
    ({"fed.poison-rate": 0.1}, 94, "fed.failure-rate and fed.poison-rate to 0"),
    ({"secagg.num-shares": 5, "secagg.reconstruction-threshold": 4}, 3,
     r"at least secagg.reconstruction-threshold \(4\) devices per round; got 3"),
    ({}, 1024, r"set secagg.quantization-range <= 4194303"),
    ({"privacy.mode": "user", "privacy.delta": 0.01}, 94, "'privacy.delta' must be below 1/943"),
])
def test_what_secagg_cannot_do_is_refused(overrides, k, match):
    cfg = load_config({**FEDAVG, "secagg.enabled": True, **overrides})
    with pytest.raises(FedrecError, match=match):
        secagg.check(cfg, k=k, population=943)


def test_client_side_clipping_scales_the_whole_update():
    update = [np.full((2, 2), 3.0), np.array([4.0])]  # norm sqrt(36 + 16)
    clipped = secagg.clip_update(update, 1.0)
    assert np.sqrt(sum(float((u ** 2).sum()) for u in clipped)) == pytest.approx(1.0)
    assert clipped[1][0] / clipped[0][0, 0] == pytest.approx(4.0 / 3.0)
    assert secagg.clip_update(update, 100.0)[0][0, 0] == 3.0


@pytest.mark.slow
def test_flwr_run_with_secagg_equals_fedavg_of_the_same_updates(tmp_path):
    """A real `flwr run` (SuperLink, Ray, one virtual SuperNode per user) of 4 devices x 2
    rounds with SecAgg+: round 1's global model is the FedAvg of the 4 updates computed
    here, up to quantisation error; nothing is left running."""
    from test_simulate import flwr_processes, write_tiny_dataset

    from fedrec.federation.simulate import run_simulation

    data_dir = write_tiny_dataset(tmp_path / "data", n_users=4)
    cfg = Config.from_flat(load_defaults()).override(**{
        "data.dataset": str(data_dir), "data.cache-dir": str(tmp_path / "cache"),
        "data.eval-negatives": 20, "model.kind": "fedmf", "model.dim": 8,
        "fed.num-rounds": 2, "fed.clients-per-round": 0, "fed.eval-every": 1, "fed.server-lr-warmup": 0,
        "train.batch-size": 32, "secagg.enabled": True, **FEDAVG})
    p = prepare(cfg)
    split = p.split
    run_dir = tmp_path / "run"
    res = run_simulation(cfg, None, run_dir, num_supernodes=4, log=lambda _: None, timeout=300)

    assert res["status"] == "completed"
    for rnd in (1, 2):
        assert _round(res, rnd)["train"]["clients"] == 4
        assert _round(res, rnd)["federated"]["users"] == 4
    start = _initial(cfg)
    updates, weights = [], []
    for u in range(split.n_users):
        data = ClientData.from_split(split, u)
        params, _, m = local_update(cfg, p.item_emb, data, start, None, client_seed(cfg, u, 1))
        updates.append(params)
        weights.append(m["num-examples"])
    w = np.array(weights, float)
    want = {k: sum(wi * p[k].astype(np.float64) for wi, p in zip(w, updates)) / w.sum()
            for k in start}
    got = load_file(str(run_dir / "checkpoints" / "round-0001.safetensors"))
    assert _max_diff(want, start) > 1e-3
    err, bound = _max_diff(want, got), quantisation_bound(cfg, w, w.max())
    print(f"\nflwr run: max |secagg - fedavg| = {err:.2e}, bound {bound:.2e}")
    assert err <= bound + 1e-6
    assert flwr_processes(run_dir / ".flwr") == []
