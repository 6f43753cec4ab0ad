"""Differential privacy: DP-SGD over blocks for every model (fedrec/privacy/dpsgd.py), its
cumulative accounting through context.state, the noise solved for a target ε, ε in every
train reply; user-level DP-FedAvg on the server (fedrec/federation/server_opt.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from test_clientapp import context, global_state, message

import clients.app
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.errors import FedrecError
from fedrec.federation.local import local_update
from fedrec.federation.server_opt import UserDP
from fedrec.models.build import build_model
from fedrec.models.fedmf import FedMF
from fedrec.models.protocol import blocks, target_mask
from fedrec.models.seqrec import SeqRec
from fedrec.privacy.accounting import (
    Accountant,
    describe,
    label,
    local_plan,
    noise_multiplier,
    user_epsilon,
)
from fedrec.privacy.dpsgd import clipped_grad_sum, dp_epoch
from tiny import run_inprocess, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")
DP = {"privacy.mode": "sample", "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 1.0}
USER = {"privacy.mode": "user", "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 0.5}


def _seq(**kw) -> SeqRec:
    torch.manual_seed(0)
    m = SeqRec(12, 20, dim=16, hidden=16, layers=2, heads=2, max_len=6, dropout=0.0, **kw)
    with torch.no_grad():  # give the zero-initialised parts values, so every path matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.train()


def _fedmf() -> FedMF:
    torch.manual_seed(0)
    return FedMF(20, 16, max_len=6).train()


MODELS = {"seq": lambda: _seq(), "seq-text": lambda: _seq(id_embeddings=False),
          "seq-id": lambda: _seq(item_text=False), "fedmf": _fedmf}


@pytest.mark.parametrize("kind", list(MODELS))
def test_clipped_sum_is_the_sum_of_each_blocks_clipped_gradient(kind):
    """One path for every model: each block's gradient of its mean target loss, the
    user-local vector (FedMF) clipped together with the federated parameters."""
    m, E = MODELS[kind](), torch.randn(20, 12)
    user = m.new_users(1, torch.Generator().manual_seed(3))[0] if m.user_dim else None
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[19] = False
    for C, rows in ((1e6, blocks(np.arange(1, 19), 6)), (0.05, blocks(np.arange(1, 19), 6)),
                    (0.05, blocks(np.arange(3, 8), 6))):  # the last: one block alone
        rows = torch.from_numpy(rows)
        got, got_user, norms = clipped_grad_sum(m, E, rows, allowed, C, user)
        want = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
        want_user = torch.zeros(m.user_dim)
        for r, row in enumerate(rows):
            m.zero_grad()
            u = None if user is None else user.detach().clone().requires_grad_()
            seq = row[None]
            loss = m.loss(E, seq, allowed, reduction="row",
                          user=None if u is None else u[None])[0] / target_mask(seq).sum()
            loss.backward()
            g = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                 for k, p in m.named_parameters()}
            gu = torch.zeros(0) if u is None else u.grad
            norm = float(torch.sqrt(sum(v.pow(2).sum() for v in g.values()) + gu.pow(2).sum()))
            assert norms[r] == pytest.approx(norm, rel=1e-4)
            scale = min(1.0, C / (norm + 1e-6))
            for k in want:
                want[k] += g[k] * scale
            if u is not None:
                want_user += gu * scale
        for k, value in want.items():
            torch.testing.assert_close(got[k], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_user, want_user, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["seq", "fedmf"])
def test_dp_with_no_noise_and_no_clipping_is_plain_sgd_on_the_mean_block_loss(kind):
    """sigma 0, C huge, q 1: one step whose gradient is the mean over blocks of each
    block's mean target loss, for the federated parameters and the user vector alike."""
    E = torch.randn(20, 12)
    rows = blocks(np.arange(1, 19), 6)
    allowed = torch.ones(20, dtype=torch.bool)
    out = []
    for dp in (True, False):
        m = MODELS[kind]()
        user = None
        if m.user_dim:
            user = m.new_users(1, torch.Generator().manual_seed(3))[0].requires_grad_()
        opt = torch.optim.SGD(list(m.parameters()) + ([user] if user is not None else []),
                              lr=0.5)
        if dp:
            dp_epoch(m, opt, E, rows, allowed, 1.0, 0.0, 1e9, np.random.default_rng(0),
                     user=user)
        else:
            seq = torch.from_numpy(rows)
            users = None if user is None else user[None].expand(len(rows), -1)
            per_row = m.loss(E, seq, allowed, reduction="row", user=users)
            (per_row / target_mask(seq).sum(1)).mean().backward()
            opt.step()
        out.append([p.detach().clone() for p in m.parameters()]
                   + ([user.detach().clone()] if user is not None else []))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_clipping_and_noise_change_the_update():
    E, rows = torch.randn(20, 12), blocks(np.arange(1, 19), 6)
    allowed = torch.ones(20, dtype=torch.bool)
    results = []
    for sigma, clip in ((0.0, 1e6), (0.0, 1e-3), (1.0, 1e6)):
        m = _seq()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        dp_epoch(m, opt, E, rows, allowed, 1.0, sigma, clip, np.random.default_rng(0),
                 torch.Generator().manual_seed(0))
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert not torch.allclose(results[0], results[1])
    assert not torch.allclose(results[0], results[2])


def test_every_private_result_names_its_unit(cfg):
    c = cfg.override(**DP)
    unit = "block of up to 9 consecutive interactions"  # model.max-len 8 in the tiny config
    assert describe(c) == {"mode": "sample", "unit": unit, "accountant": "rdp", "delta": 1e-4}
    assert describe(c.override(**{"model.kind": "fedmf"}))["unit"] == unit
    assert label(c) == f"ε ({unit}; rdp, δ=0.0001)"
    assert describe(cfg.override(**USER))["unit"] == "user"
    assert describe(cfg)["unit"] == "none"


def test_vectorised_rdp_equals_opacus():
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedrec.privacy.accounting import _RDP_ORDERS, _sampled_gaussian_rdp

    orders = np.array(_RDP_ORDERS, dtype=float)
    for q in (1e-3, 0.043, 0.25, 0.5, 0.9, 1.0):
        for sigma in (0.3, 0.8, 1.0, 2.5, 10.0):
            want = np.array(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_RDP_ORDERS))
            got = _sampled_gaussian_rdp(q, sigma, orders)
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12, err_msg=f"{q} {sigma}")
    assert (_sampled_gaussian_rdp(0.3, 0.0, orders) == np.inf).all()
    assert (_sampled_gaussian_rdp(0.0, 1.0, orders) == 0).all()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_solved_noise_lands_at_or_just_below_the_target(cfg, accountant):
    target = 2.0
    c = cfg.override(**DP, **{"privacy.target-epsilon": target, "privacy.accountant": accountant})
    n, participation = 11, 0.3
    sigma = noise_multiplier(c, n, participation)
    q, per_round, rounds = local_plan(c, n, participation)
    acc = Accountant(accountant)
    for _ in range(rounds):
        acc.step(sigma, q, per_round)
    eps = acc.epsilon(c.privacy.delta)
    assert 0.98 * target <= eps <= target
    assert rounds == 2  # ceil(6 rounds x 0.3)


def test_accountant_round_trips_through_a_config_record():
    acc = Accountant("rdp")
    acc.step(1.1, 0.5, 4)
    acc.step(1.1, 0.5, 4)  # same mechanism: merged
    acc.step(0.9, 0.25, 8)
    record = ConfigRecord(acc.to_state())
    back = Accountant.from_state(record, "rdp")
    assert back.history == [(1.1, 0.5, 8), (0.9, 0.25, 8)]
    assert back.epsilon(1e-4) == acc.epsilon(1e-4) > 0
    with pytest.raises(ValueError, match="accountant 'rdp' differs"):
        Accountant.from_state(record, "prv")


def test_epsilon_grows_over_rounds_joined_and_stays_put_in_rounds_skipped(cfg, prepared):
    c = cfg.override(**DP)
    n = prepared.split.n_users
    ctx = context(c, 0, n)
    state = global_state(c, prepared)
    eps = []
    for rnd, kind in ((1, "train"), (2, "evaluate"), (3, "evaluate"), (4, "train"),
                      (5, "train")):
        reply = clients.app.app(message(kind, state, rnd), ctx)
        assert not reply.has_error(), reply.error if reply.has_error() else ""
        stored = Accountant.from_state(ctx.state["privacy-accountant"], "rdp")
        eps.append(stored.epsilon(c.privacy.delta))
        if kind == "train":
            metrics = reply.content["metrics"]
            assert metrics["epsilon"] == pytest.approx(eps[-1])
            assert metrics["num-examples"] == 1 and "train-loss" not in metrics
    assert 0 < eps[0] == eps[1] == eps[2] < eps[3] < eps[4]
    # a fresh context (a new ClientApp process restoring the state) continues the count
    ctx2 = context(c, 0, n)
    ctx2.state = RecordDict({"privacy-accountant": ctx.state["privacy-accountant"]})
    reply = clients.app.app(message("train", state, 6), ctx2)
    assert reply.content["metrics"]["epsilon"] > eps[-1]


def test_local_update_in_sample_mode_needs_an_accountant(cfg, prepared):
    c = cfg.override(**DP)
    data = ClientData.from_split(prepared.split, 0)
    with pytest.raises(ValueError, match="needs the device's accountant"):
        local_update(c, prepared.item_emb, data, global_state(c, prepared), None, seed=0)


@pytest.mark.parametrize("kind", ["seq", "fedmf"])
@pytest.mark.parametrize("mode, unit, clip", [
    ("user", "user", 0.5),  # DP-FedAdam: each device's update clipped, the mean noised
    ("sample", "block of up to 9 consecutive interactions", 1.0)])  # DP-SGD over blocks
def test_both_privacy_modes_run_end_to_end(tiny_root, kind, mode, unit, clip):
    """Both units of privacy, every model, through the real ServerApp and ClientApp: the
    unit is named, ε is cumulative and grows, and no reply reports a training loss."""
    cfg = tiny_config(tiny_root, {"model.kind": kind, "privacy.mode": mode,
                                  "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": clip,
                                  "fed.num-rounds": 3, "fed.clients-per-round": 4,
                                  "fed.run-dir": str(tiny_root / f"{kind}-{mode}-dp")})
    _, results = run_inprocess(cfg)
    assert results["status"] == "completed" and results["privacy"]["unit"] == unit
    trains = [r["train"] for r in results["rounds"] if "train" in r]
    assert len(trains) == 3 and all(t["clients"] == 4 and t["failures"] == 0 for t in trains)
    eps = [t["epsilon-max"] for t in trains]
    assert 0 < eps[0] <= eps[1] <= eps[2] and eps[0] < eps[2]
    assert all(t["epsilon-mean"] <= t["epsilon-max"] for t in trains)
    assert all("train-loss" not in t for t in trains)
    assert ("server" in results["rounds"][-1]) == (kind == "seq")  # FedMF: devices only


def test_user_mode_clips_the_update_on_the_device_and_reports_equal_weights(cfg, prepared):
    from flwr.app import ArrayRecord, Message

    c = cfg.override(**USER)
    state = global_state(c, prepared)
    content = RecordDict({"arrays": ArrayRecord(state),
                          "config": ConfigRecord({"server-round": 1, "clipping_norm": 1e-3})})
    reply = clients.app.app(Message(content, dst_node_id=7, message_type="train"),
                            context(c, 0, prepared.split.n_users))
    assert not reply.has_error()
    got = reply.content["arrays"]
    norm = np.sqrt(sum(((got[k].numpy() - v.numpy()) ** 2).sum() for k, v in state.items()))
    assert 0 < norm <= 1e-3 * (1 + 1e-5)
    assert dict(reply.content["metrics"]) == {"num-examples": 1}


def test_user_mode_stops_before_the_round_that_would_exceed_the_budget(cfg, prepared):
    k, n = 4, prepared.split.n_users
    q = k / n
    c = cfg.override(**USER, **{"fed.num-rounds": 6, "fed.clients-per-round": k})
    e2, e3 = user_epsilon(c, 2, q), user_epsilon(c, 3, q)
    c = c.override(**{"privacy.target-epsilon": (e2 + e3) / 2})
    _, results = run_inprocess(c)
    assert results["status"] == "stopped"
    assert results["stopped"].startswith("privacy budget exhausted: round 3 would bring "
                                         "ε (user; rdp, δ=0.0001) to")
    trained = [r for r in results["rounds"] if "train" in r]
    assert [r["round"] for r in trained] == [1, 2]
    assert [r["train"]["epsilon-max"] for r in trained] == pytest.approx(
        [user_epsilon(c, 1, q), e2])
    assert results["privacy"]["unit"] == "user"
    assert (Path(c.fed.run_dir) / "final.safetensors").is_file()  # the last (noised) model


def test_user_mode_rejects_a_non_mean_aggregator_a_large_delta_and_a_too_large_sigma(cfg):
    with pytest.raises(FedrecError, match="needs fed.strategy fedavg, fedprox or fedadam"):
        UserDP(cfg.override(**USER, **{"fed.strategy": "fedmedian"}), 4, 13)
    with pytest.raises(FedrecError, match="'privacy.delta' must be below 1/13 users"):
        UserDP(cfg.override(**USER, **{"privacy.delta": 0.1}), 4, 13)
    with pytest.raises(FedrecError, match="'adaptive' does not work with secagg"):
        cfg.override(**USER, **{"privacy.clipping": "adaptive", "secagg.enabled": True})
    with pytest.raises(FedrecError, match="privacy.clipping = 'adaptive' with 4 devices"):
        UserDP(cfg.override(**{**USER, "privacy.clipping": "adaptive",
                               "privacy.noise-multiplier": 5.0}), 4, 13)


def test_user_level_noise_is_sigma_c_over_k_on_the_mean_update_whatever_arrives(cfg):
    """A fixed denominator: n of k sampled devices arrived, the mean of their updates is
    scaled to a sum over k, and the noise is sigma C / k per coordinate."""
    dp = UserDP(cfg.override(**USER), k=4, population=13)
    out = dp.noised({"w": np.full(200_000, 0.2)}, n=2)["w"]
    assert out.mean() == pytest.approx(0.2 * 2 / 4, abs=0.002)
    assert out.std() == pytest.approx(1.0 * 0.5 / 4, rel=0.01)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_adaptive_clipping_moves_the_norm_toward_the_quantile(cfg, strategy):
    """privacy.clipping = 'adaptive': C starts at max-grad-norm; with every device's update
    far below it (none clipped, target 0.9 clipped) it shrinks round after round; the
    round's C is recorded, and ε is the bound of fixed clipping at the same total σ (the
    update and the clipped count share it)."""
    k = 4
    c = cfg.override(**{**USER, "fed.strategy": strategy, "fed.num-rounds": 3,
                        "fed.clients-per-round": k, "privacy.clipping": "adaptive",
                        "privacy.max-grad-norm": 10.0, "privacy.clipped-quantile": 0.9,
                        "privacy.clip-norm-lr": 0.5, "privacy.noise-multiplier": 1e-3})
    _, results = run_inprocess(c)
    trains = [r["train"] for r in results["rounds"] if "train" in r]
    assert results["status"] == "completed" and len(trains) == 3
    norms = [t["clipping-norm"] for t in trains]
    assert norms[0] == 10.0 and norms[2] < norms[1] < norms[0]  # nothing clipped: C falls
    q = k / prepare(c).split.n_users
    assert [t["epsilon-max"] for t in trains] == pytest.approx(
        [user_epsilon(c, r, q) for r in (1, 2, 3)])
    tiny = c.override(**{"privacy.max-grad-norm": 1e-6, "privacy.clipped-quantile": 0.1,
                         "fed.run-dir": str(Path(c.fed.run_dir).parent / "tiny-c")})
    _, results = run_inprocess(tiny)  # every update clipped: C grows
    norms = [r["train"]["clipping-norm"] for r in results["rounds"] if "train" in r]
    assert norms[0] == 1e-6 and norms[0] < norms[1] < norms[2]


def test_a_device_declines_a_round_that_would_exceed_its_budget(cfg, prepared):
    """sigma is solved for the expected participation; a device sampled more often stops
    at its budget instead of overspending (the server then drops and counts its reply)."""
    from fedrec.federation.local import DeviceBudgetExhausted

    c = cfg.override(**DP, **{"privacy.target-epsilon": 2.0, "fed.num-rounds": 4})
    data = ClientData.from_split(prepared.split, 0)
    acc, arrays, done = Accountant("rdp"), global_state(c, prepared), 0
    with pytest.raises(DeviceBudgetExhausted, match="privacy budget exhausted on this device"):
        for seed in range(10):
            local_update(c, prepared.item_emb, data, arrays, None, seed=seed, accountant=acc,
                         participation=1.0)
            done += 1
    assert done == 4  # every planned round, and not one more
    assert 0.98 * 2.0 <= acc.epsilon(1e-4) <= 2.0


def test_balanced_sampling_spends_every_budget_without_declined_rounds(cfg, prepared):
    """fed.sampling = "balanced": 6 rounds of 4 of the 13 devices train each device in 1 or
    2 rounds (the planned ceil(6 x 4 / 13) = 2), so no device declines; uniform sampling
    with the same seed asks some device a third time and it declines."""
    from fedrec.federation.inprocess import InProcessGrid

    class Counting(InProcessGrid):
        def _call(self, msg):
            if msg.metadata.message_type == "train":
                self.trained.append(msg.metadata.dst_node_id)
            return super()._call(msg)

    out = {}
    for sampling in ("balanced", "uniform"):
        c = cfg.override(**DP, **{"privacy.target-epsilon": 4.0, "fed.num-rounds": 6,
                                  "fed.clients-per-round": 4, "fed.eval-every": 6,
                                  "fed.sampling": sampling})
        grid = Counting(clients.app.app, c.to_flat(), prepared.split.n_users)
        grid.trained = []
        _, results = run_inprocess(c, grid)
        counts = np.bincount(grid.trained, minlength=prepared.split.n_users + 1)[1:]
        trains = [r["train"] for r in results["rounds"] if "train" in r]
        out[sampling] = (counts, sum(t["failures"] for t in trains), trains)
    counts, failures, trains = out["balanced"]
    assert prepared.split.n_users == 13 and counts.sum() == 24
    assert set(counts) == {1, 2} and failures == 0
    assert all(t["clients"] == 4 for t in trains)
    assert max(t["epsilon-max"] for t in trains) <= 4.0
    counts, failures, _ = out["uniform"]
    assert counts.max() > 2 and failures == (counts - 2).clip(0).sum()


def test_a_resumed_simulated_device_continues_its_epsilon(cfg, prepared, tmp_path):
    """A killed simulation loses context.state; the device's disk keeps its accountant
    history with its user-local state, so after --resume ε continues, not restarts."""
    c = cfg.override(**DP, **{"fed.run-dir": str(tmp_path / "run")})
    n, state = prepared.split.n_users, global_state(c, prepared)
    ctx = context(c, 0, n)
    eps1 = clients.app.app(message("train", state, 1), ctx).content["metrics"]["epsilon"]
    whole = clients.app.app(message("train", state, 2), ctx).content["metrics"]["epsilon"]
    restarted = context(c.override(**{"fed.resume": True}), 0, n)  # fresh context.state
    reply = clients.app.app(message("train", state, 2), restarted)
    assert not reply.has_error()
    assert reply.content["metrics"]["epsilon"] == pytest.approx(whole) and whole > eps1
    fresh = context(c.override(**{"fed.run-dir": str(tmp_path / "other")}), 0, n)
    assert clients.app.app(message("train", state, 2), fresh).content["metrics"][
        "epsilon"] == pytest.approx(eps1)  # without the disk: one round's ε (the old failure)


def test_a_resumed_secagg_device_continues_its_epsilon(cfg, prepared, tmp_path):
    """The SecAgg+ path (fedrec/federation/secagg.py's legacy Device) keeps its accountant the same
    way: a device whose context.state is new after --resume reads it from its disk."""
    from fedrec.federation.secagg import Device

    c = cfg.override(**DP, **{"fed.run-dir": str(tmp_path / "run"), "secagg.enabled": True})
    n, state = prepared.split.n_users, global_state(c, prepared)
    params = [a.numpy() for a in state.values()]

    def fit(ctx, rnd):
        return Device(ctx).fit(params, {"server-round": rnd})[2]["epsilon"]

    ctx = context(c, 0, n)
    eps1, whole = fit(ctx, 1), fit(ctx, 2)
    restarted = context(c.override(**{"fed.resume": True}), 0, n)  # fresh context.state
    assert fit(restarted, 2) == pytest.approx(whole) and whole > eps1
    fresh = context(c.override(**{"fed.run-dir": str(tmp_path / "other")}), 0, n)
    assert fit(fresh, 2) == pytest.approx(eps1)


def test_device_noise_and_sampling_do_not_come_from_seeds_the_server_knows(cfg, prepared):
    """The server knows train.seed, the user and the round (client_seed): DP-SGD's noise and
    Poisson sampling must not be replayable from them. Same seed, noise on: different
    updates; noise off and every row sampled: the same update."""
    E = prepared.item_emb
    data = ClientData.from_split(prepared.split, 0)
    model = build_model(cfg, E.shape[1], prepared.split.n_items)
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def update(sigma, batch):
        c = cfg.override(**{**DP, "privacy.noise-multiplier": sigma, "train.batch-size": batch})
        params, _, _ = local_update(c, E, data, arrays, None, seed=7,
                                    accountant=Accountant(c.privacy.accountant))
        return np.concatenate([v.ravel() for v in params.values()])

    assert not np.array_equal(update(1.0, 64), update(1.0, 64))
    np.testing.assert_array_equal(update(0.0, 64), update(0.0, 64))  # q = 1: all rows
