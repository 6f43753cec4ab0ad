"""Sample-level DP (fedrec/privacy/dpsgd.py): DP-SGD invariants, cumulative accounting through
context.state, the noise solved for a target ε, and ε in every train reply."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from test_clientapp import context, global_state, message

import clients.app
from fedrec.federation.local import ClientData, _histories, local_update
from fedrec.models.build import build_model
from fedrec.models.train import row_loss, row_scores, train_epoch
from fedrec.privacy.accounting import Accountant, local_plan, noise_multiplier
from fedrec.privacy.dpsgd import dp_train_epoch, per_row_grads
from tiny import run_inprocess, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")
DP = {"privacy.mode": "sample", "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 1.0}


def _setup(cfg, prepared, user=0, local=True):
    torch.manual_seed(0)
    model = build_model(cfg, prepared.item_emb.shape[1], prepared.split.n_items)
    loc = torch.randn(1, cfg.model.dim).mul(0.1).requires_grad_() if local else None
    data = ClientData.from_split(prepared.split, user)
    negs = np.random.default_rng(1).integers(0, prepared.split.n_items,
                                             size=(len(data.history), cfg.train.negatives))
    return model, loc, data, negs


def _away_from_init(model, scale: float = 0.1) -> None:
    """Perturb every parameter (the adapters start with zero last layers), so every gradient
    in a per-row comparison is live."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


MODELS = {"text": {}, "fedmf": {"model.kind": "fedmf"}, "text-nopool": {"model.pooling": "none"},
          "text-nopool-id": {"model.pooling": "none", "model.id-embeddings": True}}


@pytest.mark.parametrize("kind", ["text", "fedmf", "text-nopool"])
def test_per_row_gradients_average_to_the_batch_gradient(tiny_root, kind):
    from fedrec.data.pipeline import prepare

    cfg = tiny_config(tiny_root, MODELS[kind])
    prepared = prepare(cfg, with_text=cfg.model.kind == "text")
    model, loc, data, negs = _setup(cfg, prepared)
    E, hist = torch.from_numpy(prepared.item_emb), _histories(data)
    rows = np.array([0, 2, 3, 5])
    g, gl = per_row_grads(model, loc, E, hist, rows, negs[rows], cfg.train.loss)
    cand = torch.from_numpy(np.concatenate([data.history[rows, None], negs[rows]], axis=1))
    loss = row_loss(row_scores(model, E, hist, loc, torch.zeros(len(rows), dtype=torch.long),
                               cand), cfg.train.loss)
    names = [k for k, _ in model.named_parameters()]
    want = torch.autograd.grad(loss, [p for _, p in model.named_parameters()] + [loc])
    for name, w in zip(names, want):
        assert torch.allclose(g[name].mean(0), w, atol=1e-6), name
    assert torch.allclose(gl.mean(0), want[-1].reshape(-1), atol=1e-6)


@pytest.mark.parametrize("pooling", ["attention", "none"])
def test_dp_with_zero_noise_and_huge_clipping_equals_plain_training(cfg, prepared, pooling):
    # batch-size >= history: Poisson rate 1, one step per epoch = plain training's one batch
    # (pooling "none" takes the direct per-row path, attention the pooled ghost norms)
    cfg = cfg.override(**{"train.batch-size": 64, "model.pooling": pooling})
    E = torch.from_numpy(prepared.item_emb)
    out = []
    for dp in (False, True):
        model, loc, data, negs = _setup(cfg, prepared)
        # SGD, not Adam: Adam rescales a gradient that is mathematically zero (the attention
        # output bias: softmax ignores a shared shift) so float rounding alone would differ.
        hist, opt = _histories(data), torch.optim.SGD(list(model.parameters()) + [loc], lr=0.5)
        rng = np.random.default_rng(0)
        for _ in range(3):
            if dp:
                q, steps = dp_train_epoch(model, loc, opt, E, hist, cfg, rng,
                                          lambda n, negs=negs: negs,
                                          noise_multiplier=0.0, max_grad_norm=1e6)
                assert (q, steps) == (1.0, 1)
            else:
                train_epoch(model, loc, opt, E, hist, cfg, rng, lambda segs, negs=negs: negs)
        out.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                    loc.detach().clone()))
    (plain, plain_loc), (private, private_loc) = out
    moved = max((plain[k] - _setup(cfg, prepared)[0].state_dict()[k]).abs().max() for k in plain)
    assert moved > 1e-3  # training did something
    for k in plain:
        assert torch.allclose(plain[k], private[k], atol=1e-5), k
    assert torch.allclose(plain_loc, private_loc, atol=1e-5)


@pytest.mark.parametrize("kind", ["text-nopool", "text-nopool-id", "fedmf"])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_direct_per_row_path_equals_the_torch_func_path(tiny_root, kind, loss):
    """Ghost norms and the clipped sum without per-row gradients: the same numbers as
    clipping torch.func's per-row gradients, with some rows clipped and none clipped."""
    from fedrec.data.pipeline import prepare
    from fedrec.privacy.dpsgd import clipped_grad_sum, direct_path_ok

    cfg = tiny_config(tiny_root, {**MODELS[kind], "train.loss": loss})
    prepared = prepare(cfg, with_text=cfg.model.kind == "text")
    model, loc, data, negs = _setup(cfg, prepared)
    _away_from_init(model)
    assert direct_path_ok(model, loc)
    E, hist = torch.from_numpy(prepared.item_emb), _histories(data)
    rows = np.array([0, 1, 3, 4, 6])
    negs = negs.copy()
    negs[1, 1] = negs[1, 0]  # a negative drawn twice in one row (embedding rows coincide)
    negs[3, 0] = data.history[0]  # another row's positive as a negative
    g, gl = per_row_grads(model, loc, E, hist, rows, negs[rows], cfg.train.loss)
    norms = torch.cat([v.reshape(len(rows), -1) for v in g.values()] + [gl], 1).norm(dim=1)
    for clip in (1e6, float(norms.median())):
        direct = clipped_grad_sum(model, loc, E, hist, rows, negs[rows], cfg.train.loss,
                                  clip, "direct")
        vmapped = clipped_grad_sum(model, loc, E, hist, rows, negs[rows], cfg.train.loss,
                                   clip, "vmap")
        torch.testing.assert_close(direct[2], norms, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(direct[2], vmapped[2], rtol=1e-5, atol=1e-5)
        assert set(direct[0]) == {n for n, _ in model.named_parameters()}
        for name, want in vmapped[0].items():
            torch.testing.assert_close(direct[0][name], want, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(direct[1], vmapped[1], rtol=1e-5, atol=1e-5)
    assert (norms > clip).any() and (norms < clip).any()  # the second clip clipped some rows
    pooled = build_model(tiny_config(tiny_root), 8, prepared.split.n_items)
    assert not direct_path_ok(pooled, loc)  # a history pool: rows share it


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("with_local", [True, False])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_pooled_ghost_norms_equal_the_torch_func_path(tiny_root, pooling, with_local, loss):
    """privacy.pool-gradient = "full" without per-row gradients (fedrec/privacy/pooled_norms.py):
    per-row norms and the clipped sum through each row's leave-one-out pool of the whole
    history equal torch.func's, with some rows clipped and none clipped; including a row
    whose positive carries nearly all the attention (the second weight profile)."""
    from fedrec.data.pipeline import prepare
    from fedrec.privacy.dpsgd import clipped_grad_sum, per_row_method
    from fedrec.privacy.pooled_norms import pooled_clipped_sum, pooled_path_ok

    cfg = tiny_config(tiny_root, {"model.pooling": pooling, "model.dropout": 0.0,
                                  "model.user-embedding": with_local, "train.loss": loss})
    prepared = prepare(cfg)
    model, loc, data, negs = _setup(cfg, prepared, local=with_local)
    _away_from_init(model)
    assert pooled_path_ok(model) and per_row_method(model, loc) == "pooled"
    assert per_row_method(model, loc, "none") == "direct"
    assert per_row_method(build_model(cfg.override(**{"model.id-embeddings": True}), 8,
                                      prepared.split.n_items), loc) == "vmap"
    E, hist = torch.from_numpy(prepared.item_emb), _histories(data)
    rows = np.arange(min(6, len(data.history)))
    negs = negs.copy()
    negs[2, 0] = data.history[1]  # another row's positive (and a pooled item) as a negative
    cases = [None]
    if pooling == "attention":  # then sharpen the attention until one item dominates
        cases.append(0)
    for boost in cases:
        if boost is not None:
            with torch.no_grad():
                a = model.items(E[hist.items], hist.items)[2]
                model.attention[2].weight.mul_(30.0 / (a.max() - a.min()).clamp_min(1e-3))
                a = model.items(E[hist.items], hist.items)[2]
            rows = np.array([int(a.argmax())] + [r for r in range(6) if r != int(a.argmax())][:4])
            assert torch.exp(a - a.max()).sum() - 1 < 0.5  # the rest: under half the top's weight
        g, gl = per_row_grads(model, loc, E, hist, rows, negs[rows], cfg.train.loss)
        flat = [v.reshape(len(rows), -1) for v in g.values()] + ([] if gl is None else [gl])
        norms = torch.cat(flat, 1).norm(dim=1)
        cache = {}  # the history's text Gram, computed at the first call and then reused
        for clip in (1e6, float(norms.median())):
            got = pooled_clipped_sum(model, loc, E, hist, rows, negs[rows], cfg.train.loss, clip,
                                     cache)
            assert cache["K_x"][0] is hist.items
            want = clipped_grad_sum(model, loc, E, hist, rows, negs[rows], cfg.train.loss,
                                    clip, "vmap")
            torch.testing.assert_close(got[2], norms, rtol=1e-4, atol=1e-5)
            for name, w_ in want[0].items():
                torch.testing.assert_close(got[0][name], w_, rtol=1e-4, atol=1e-5, msg=name)
            if with_local:
                torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
            else:
                assert got[1] is None
        assert (norms > clip).any() and (norms < clip).any()


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_pooled_ghost_norms_on_the_shortest_histories(tiny_root, pooling):
    """One history item (its row's pool is empty) and two or three: the same clipped sums
    and norms as torch.func."""
    from fedrec.data.pipeline import prepare
    from fedrec.models.train import Histories
    from fedrec.privacy.dpsgd import clipped_grad_sum

    cfg = tiny_config(tiny_root, {"model.pooling": pooling, "model.dropout": 0.0})
    prepared = prepare(cfg)
    E = torch.from_numpy(prepared.item_emb)
    torch.manual_seed(0)
    model = build_model(cfg, E.shape[1], prepared.split.n_items)
    _away_from_init(model, 0.3)
    loc = torch.randn(1, cfg.model.dim) * 0.1
    for n in (1, 2, 3):
        hist = Histories(torch.arange(n) + 3, torch.zeros(n, dtype=torch.long), 1)
        rows = np.arange(n)
        negs = np.random.default_rng(n).integers(0, prepared.split.n_items, (n, 4))
        got, want = (clipped_grad_sum(model, loc, E, hist, rows, negs, "bce", 0.5, method)
                     for method in ("pooled", "vmap"))
        torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)
        for name, w in want[0].items():
            torch.testing.assert_close(got[0][name], w, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


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


def test_describe_assumes_a_public_pool_only_for_history_pooled_models(cfg):
    from fedrec.privacy.accounting import describe, label

    c = cfg.override(**DP)
    assert describe(c)["assumes"] == "history pool public"
    assert "history pool public" in label(c)
    for other in ({"model.pooling": "none"}, {"model.kind": "fedmf"}):
        d = describe(c.override(**other))
        assert "assumes" not in d and d["unit"] == "interaction"
        assert label(c.override(**other)) == "ε (interaction; rdp, δ=0.0001)"


def test_clipping_and_noise_change_the_update(cfg, prepared):
    E = torch.from_numpy(prepared.item_emb)
    results = []
    for sigma, clip in ((0.0, 1e6), (0.0, 1e-3), (1.0, 1e6)):
        model, loc, data, negs = _setup(cfg, prepared)
        opt = torch.optim.SGD(list(model.parameters()) + [loc], lr=0.1)
        torch.manual_seed(5)
        dp_train_epoch(model, loc, opt, E, _histories(data), cfg, np.random.default_rng(0),
                       lambda n, negs=negs: negs, noise_multiplier=sigma, max_grad_norm=clip)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
    assert not torch.allclose(results[0], results[2])


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


@pytest.mark.parametrize("pooling", ["attention", "none"])
def test_every_train_reply_carries_epsilon_and_the_run_records_it(cfg, prepared, pooling):
    c = cfg.override(**DP, **{"fed.num-rounds": 3, "fed.clients-per-round": 4,
                              "model.pooling": pooling})
    _, results = run_inprocess(c)
    clean = {"mode": "sample", "unit": "interaction", "accountant": "rdp", "delta": 1e-4}
    # pooling "none": no history pool, so the ε holds as stated (fedrec/privacy/dpsgd.py)
    assert results["privacy"] == (clean if pooling == "none"
                                  else {**clean, "assumes": "history pool public"})
    trains = [r["train"] for r in results["rounds"] if "train" in r]
    assert len(trains) == 3 and all(t["clients"] == 4 and t["failures"] == 0 for t in trains)
    maxes = [t["epsilon-max"] for t in trains]
    assert all(t["epsilon-mean"] <= t["epsilon-max"] for t in trains)
    assert 0 < maxes[0] <= maxes[1] <= maxes[2]


# -- user-level DP (fedrec/privacy/user_dp.py) -------------------------------------------------------

USER = {"privacy.mode": "user", "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 0.5}


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
    from fedrec.privacy.user_dp import user_epsilon

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


def test_user_mode_rejects_a_non_mean_aggregator_and_a_large_delta(cfg):
    from fedrec.errors import FedrecError
    from fedrec.privacy.user_dp import wrap_user_dp

    with pytest.raises(FedrecError, match="needs fed.strategy fedavg, fedprox or fedadam"):
        wrap_user_dp(cfg.override(**USER, **{"fed.strategy": "fedmedian"}), None, None, 13, 4)
    with pytest.raises(FedrecError, match="'privacy.delta' must be below 1/13 users"):
        wrap_user_dp(cfg.override(**USER, **{"privacy.delta": 0.1}), None, None, 13, 4)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_adaptive_clipping_moves_the_norm_toward_the_quantile(cfg, strategy):
    """privacy.clipping = 'adaptive' (Flower's adaptive clipping wrapper and mod): C starts
    at max-grad-norm; with every device's update far below it (none clipped, target 0.9
    clipped) it shrinks round after round; the round's C is recorded, and ε is the bound of
    fixed clipping at the same total σ (the update and the clipped count share it)."""
    from fedrec.privacy.user_dp import user_epsilon

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
    q = k / prepared_users(c)
    assert [t["epsilon-max"] for t in trains] == pytest.approx(
        [user_epsilon(c, r, q) for r in (1, 2, 3)])
    tiny = c.override(**{"privacy.max-grad-norm": 1e-6, "privacy.clipped-quantile": 0.1,
                         "fed.run-dir": str(Path(c.fed.run_dir).parent / "tiny-c")})
    _, results = run_inprocess(tiny)  # every update clipped: C grows
    norms = [r["train"]["clipping-norm"] for r in results["rounds"] if "train" in r]
    assert norms[0] == 1e-6 and norms[0] < norms[1] < norms[2]


def test_adaptive_clipping_is_refused_with_secagg_and_a_too_large_sigma(cfg):
    from fedrec.errors import FedrecError
    from fedrec.federation.run_store import FederatedRun
    from fedrec.federation.strategy import make_strategy
    from fedrec.privacy.user_dp import wrap_user_dp

    with pytest.raises(FedrecError, match="'adaptive' does not work with secagg"):
        cfg.override(**USER, **{"privacy.clipping": "adaptive", "secagg.enabled": True})
    c = cfg.override(**{**USER, "privacy.clipping": "adaptive", "privacy.noise-multiplier": 5.0,
                        "fed.clients-per-round": 4})
    with pytest.raises(FedrecError, match="privacy.clipping = 'adaptive'"):
        make_strategy(c, FederatedRun(c, log=lambda *_: None), population=prepared_users(c))
    assert wrap_user_dp  # the same entry point as fixed clipping


def prepared_users(c) -> int:
    from fedrec.data.pipeline import prepare

    return prepare(c, with_text=False).split.n_users


def test_user_mode_with_fedadam_noises_the_mean_before_the_server_step(cfg, prepared):
    """Adam's moments must only see noised means: the noise moves inside, before the step."""
    from fedrec.federation.run_store import FederatedRun
    from fedrec.federation.strategy import make_strategy

    k, n = 4, prepared.split.n_users
    c = cfg.override(**USER, **{"fed.strategy": "fedadam", "fed.num-rounds": 2,
                                "fed.clients-per-round": k})
    s = make_strategy(c, FederatedRun(c, log=lambda *_: None), population=n)
    assert s.noise_multiplier == 0.0  # Flower's wrapper would noise the model after Adam
    assert s.strategy.mean_noise_std == pytest.approx(1.0 * 0.5 / k)  # sigma C / k
    from flwr.app import Array, ArrayRecord

    mean = {"w": Array(np.zeros(1000, np.float32))}
    s.strategy.current_arrays = {"w": np.zeros(1000, np.float32)}
    delta, _, _ = s.strategy._compute_deltat_and_mt(ArrayRecord(mean))
    assert np.std(delta["w"]) == pytest.approx(0.5 / k, rel=0.1)  # Adam got the noised mean
    _, results = run_inprocess(c)
    trains = [r["train"] for r in results["rounds"] if "train" in r]
    assert results["status"] == "completed" and len(trains) == 2
    assert all(t["epsilon-max"] > 0 for t in trains)


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


def test_balanced_sampling_keeps_64_bit_node_ids_and_takes_each_device_in_turn():
    """Flower's node ids use all 64 bits (a SuperLink's are random); the balanced order
    must hand back exactly those ids, k at a time, each once per pass over the devices."""
    import flwr.serverapp.strategy.fedavg as flower_fedavg

    from fedrec.federation.strategy import _balanced_sampling

    class Grid:
        def get_node_ids(self):
            # as a SuperLink's random ids: some above 2**63, some below, none exact in float
            return [2**64 - 1 - 7 * i for i in range(5)] + [2**62 + 3 * i for i in range(5)]

    ids, seen = set(Grid().get_node_ids()), []
    for rnd in range(1, 6):  # 5 rounds of 4 of 10 devices: two passes
        with _balanced_sampling(seed=3, server_round=rnd):
            picked, nodes = flower_fedavg.sample_nodes(Grid(), 10, 4)
        assert set(nodes) == ids and len(set(picked)) == 4 and set(picked) <= ids
        seen += picked
    assert seen[:10] != sorted(seen[:10])  # a seeded order, not the sorted one
    assert sorted(seen[:10]) == sorted(ids) == sorted(seen[10:])
    assert flower_fedavg.sample_nodes.__name__ == "sample_nodes"  # Flower's own, restored


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


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("with_local", [True, False])
def test_pool_as_input_direct_path_equals_per_row_autograd(tiny_root, pooling, with_local):
    """privacy.pool-gradient = "none": each row's gradient with its leave-one-out pool held
    constant, from ghost norms (item side b x c inputs, user side one per row), equals
    clipping row-by-row autograd gradients; the attention gets no gradient."""
    from fedrec.models.build import pool_history
    from fedrec.privacy.dpsgd import clipped_grad_sum, direct_path_ok, no_gradient

    cfg = tiny_config(tiny_root, {"model.pooling": pooling, "model.dropout": 0.0,
                                  "model.user-embedding": with_local})
    from fedrec.data.pipeline import prepare

    prepared = prepare(cfg)
    model, loc, data, negs = _setup(cfg, prepared, local=with_local)
    _away_from_init(model)
    assert direct_path_ok(model, loc, "none") and not direct_path_ok(model, loc, "full")
    E, hist = torch.from_numpy(prepared.item_emb), _histories(data)
    rows = np.array([0, 2, 3, 5])
    negs = negs.copy()
    negs[2, 0] = data.history[1]  # another row's positive (and a pooled item) as a negative
    names = [k for k, _ in model.named_parameters()]
    per_row = []
    for r in rows:  # the reference: one row at a time, its pool computed and detached
        with torch.no_grad():
            h, _, a = model.items(E[hist.items], hist.items)
            at = torch.arange(len(hist.items))
            pooled = pool_history(h, a, at, torch.zeros_like(at), 1, torch.zeros(1, dtype=torch.long),
                                  torch.tensor([r]))
        cand = torch.from_numpy(np.concatenate([[data.history[r]], negs[r]]))
        hc, bc, _ = model.items(E[cand], cand)
        hu = model.users(pooled, loc)
        loss = row_loss((hc @ hu[0] + bc)[None], cfg.train.loss)  # one row: its loss
        wrt = [p for _, p in model.named_parameters()] + ([loc] if with_local else [])
        g = torch.autograd.grad(loss, wrt, allow_unused=True)
        per_row.append([torch.zeros_like(w) if x is None else x for x, w in zip(g, wrt)])
    norms = torch.stack([torch.cat([x.flatten() for x in g]).norm() for g in per_row])
    for clip in (1e6, float(norms.median())):
        sums, local_sum, got = clipped_grad_sum(model, loc, E, hist, rows, negs[rows],
                                                cfg.train.loss, clip, "auto", "none")
        torch.testing.assert_close(got, norms, rtol=1e-5, atol=1e-6)
        scale = (clip / (norms + 1e-6)).clamp(max=1.0)
        for i, name in enumerate(names):
            want = sum(s * g[i] for s, g in zip(scale, per_row))
            torch.testing.assert_close(sums[name], want, rtol=1e-5, atol=1e-6, msg=name)
        if with_local:
            want = sum(s * g[-1] for s, g in zip(scale, per_row)).reshape(-1)
            torch.testing.assert_close(local_sum, want, rtol=1e-5, atol=1e-6)
        else:
            assert local_sum is None
    skip = no_gradient(model, "none")
    assert skip == ({n for n in names if n.startswith("attention.")} if pooling == "attention"
                    else set())
    for name in skip:
        assert not sums[name].any()


def test_pool_as_input_leaves_the_attention_alone_and_trains_the_rest(cfg, prepared):
    """dp_train_epoch with privacy.pool-gradient = "none": no noise where no gradient can
    be (the attention), every other federated parameter and the user vector move."""
    cfg = cfg.override(**{"privacy.pool-gradient": "none"})
    model, loc, data, negs = _setup(cfg, prepared)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loc0 = loc.detach().clone()
    opt = torch.optim.SGD(list(model.parameters()) + [loc], lr=0.1)
    dp_train_epoch(model, loc, opt, torch.from_numpy(prepared.item_emb), _histories(data), cfg,
                   np.random.default_rng(0), lambda n, negs=negs: negs, noise_multiplier=1.0,
                   max_grad_norm=1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) == k.startswith("attention."), k
    assert not torch.equal(loc.detach(), loc0)


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
