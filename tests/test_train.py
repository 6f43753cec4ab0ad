"""Training: exact loss values, leave-one-out row scores, central training learns the tiny
data, and the frozen PLM never runs once the catalog is encoded."""

import copy
import math

import numpy as np
import pytest
import torch

import fedrec.data.encoder
import fedrec.federation.local
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import evaluate
from fedrec.federation.local import ClientData, local_update
from fedrec.models.build import build_model, pool_history
from fedrec.models.seqrec import windows
from fedrec.models.train import (
    Histories,
    Proximal,
    _step,
    make_optimizer,
    row_loss,
    row_scores,
    scorer,
    train_central,
)
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("isolated")


def softplus(x):
    return math.log1p(math.exp(x))


def test_row_loss_bce_by_hand():
    scores = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.0, -2.0]])
    # positive (col 0): -log sigmoid(s) = softplus(-s); negatives: softplus(s)
    expected = np.mean([softplus(-2.0), softplus(-1.0), softplus(0.0),
                        softplus(-0.5), softplus(1.0), softplus(-2.0)])
    assert row_loss(scores, "bce").item() == pytest.approx(expected, rel=1e-6)


def test_row_loss_bpr_by_hand():
    scores = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.0, -2.0]])
    # -log sigmoid(pos - neg) = softplus(neg - pos), averaged over every (row, negative)
    expected = np.mean([softplus(-3.0), softplus(-2.0), softplus(0.5), softplus(-2.5)])
    assert row_loss(scores, "bpr").item() == pytest.approx(expected, rel=1e-6)
    # BPR only sees differences: a per-row shift changes nothing; BCE does change
    shifted = scores + torch.tensor([[5.0], [-3.0]])
    assert row_loss(shifted, "bpr").item() == pytest.approx(row_loss(scores, "bpr").item())
    assert row_loss(shifted, "bce").item() != pytest.approx(row_loss(scores, "bce").item())


def test_row_scores_equal_the_full_catalog_computation(cfg, prepared):
    """Only the touched items go through the adapters, and column 0 (the positive) is
    left out of its row's history pool: the same numbers as pooling over the catalog."""
    split, E = prepared.split, torch.from_numpy(prepared.item_emb)
    torch.manual_seed(0)
    model = build_model(cfg, E.shape[1], split.n_items).eval()
    hist = Histories.from_split(split)
    users = np.array([0, 1, 5])
    pos = np.array([split.history(u)[k] for u, k in zip(users, (0, -1, 2))])
    cand = torch.from_numpy(np.stack([pos, [3, 4, 5], [10, 11, 40], [59, 0, 1]], axis=1))
    local = torch.randn(split.n_users, cfg.model.dim)
    with torch.no_grad():
        got = row_scores(model, E, hist, local, torch.from_numpy(users), cand)
        h, b, a = model.items(E, torch.arange(split.n_items))
        pooled = pool_history(h, a, hist.items, hist.seg, hist.n_seg, torch.from_numpy(users),
                              exclude=torch.from_numpy(pos))
        hu = model.users(pooled, local[users])
        want = torch.einsum("bd,bcd->bc", hu, h[cand]) + b[cand]
    assert got.shape == cand.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def val_hr(model, split, E, local=None):
    return evaluate(scorer(model, torch.from_numpy(E), local), split, "val")["sampled/hr@10"]


@pytest.mark.parametrize("seed", [0, 1])
def test_train_central_beats_the_untrained_model(cfg, prepared, seed):
    cfg = cfg.override(**{"train.seed": seed})
    split, E = prepared.split, prepared.item_emb
    torch.manual_seed(seed)  # train_central's own initialisation
    untrained = val_hr(build_model(cfg, E.shape[1], split.n_items), split, E)
    out = train_central(cfg, split, E, log=lambda _: None)
    curve = [c["val/sampled/hr@10"] for c in out["curve"]]
    assert max(curve) >= untrained + 0.25, (untrained, curve)
    # the returned model is the best-validation epoch's, by full-ranking HR@10 (SELECT)
    full = [c["val/full/hr@10"] for c in out["curve"]]
    assert full[out["best_epoch"] - 1] == max(full)
    for key in ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10", "cold/hr@10"):
        assert key in out["final"] and key in out["best"]


def test_train_central_is_deterministic(cfg, prepared):
    cfg = cfg.override(**{"central.epochs": 2})
    a = train_central(cfg, prepared.split, prepared.item_emb, log=lambda _: None)
    b = train_central(cfg, prepared.split, prepared.item_emb, log=lambda _: None)
    assert [c["loss"] for c in a["curve"]] == [c["loss"] for c in b["curve"]]


def test_pooling_none_central_training_beats_the_untrained_model(tiny_root):
    """h_u = the user-local embedding alone (random at first), items from text."""
    from fedrec.models.build import init_local_users

    # each user vector starts random and is learned from its ~10 interactions alone:
    # more, larger steps than the history-pooled model needs
    cfg = tiny_config(tiny_root, {"model.pooling": "none", "central.batch-size": 8,
                                  "central.lr": 0.1})
    p = prepare(cfg)
    split, E = p.split, p.item_emb
    torch.manual_seed(cfg.train.seed)  # train_central's own initialisation, in its order
    model = build_model(cfg, E.shape[1], split.n_items)
    local = init_local_users(split.n_users, cfg.model.dim, "text", pooling="none")
    assert not model.uses_history and local.abs().sum() > 0
    untrained = val_hr(model, split, E, local)
    out = train_central(cfg, split, E, log=lambda _: None)
    curve = [c["val/sampled/hr@10"] for c in out["curve"]]
    assert max(curve) >= untrained + 0.25, (untrained, curve)
    assert out["curve"][-1]["loss"] < out["curve"][0]["loss"]
    assert {n for n, _ in out["model"].named_parameters()} == {
        "item_adapter.mlp.0.weight", "item_adapter.mlp.0.bias", "item_adapter.mlp.3.weight",
        "item_adapter.mlp.3.bias", "item_adapter.skip.weight", "item_bias.weight",
        "item_bias.bias"}


def test_fedmf_central_training_lowers_the_loss(tiny_root):
    cfg = tiny_config(tiny_root, {"model.kind": "fedmf", "central.epochs": 5})
    p = prepare(cfg, with_text=False)
    out = train_central(cfg, p.split, p.item_emb, log=lambda _: None)
    assert out["curve"][-1]["loss"] < out["curve"][0]["loss"]


def test_the_frozen_plm_never_runs_during_training(cfg, monkeypatch):
    from transformers import BertModel

    prepare(cfg)  # encodes the catalog once (or finds it in the on-disk cache)

    def forbidden(*args, **kwargs):
        raise AssertionError("the PLM ran during training")

    monkeypatch.setattr(fedrec.data.encoder.TextEncoder, "encode", forbidden)
    monkeypatch.setattr(BertModel, "forward", forbidden)
    fedrec.data.encoder._encoder.cache_clear()
    p = prepare(cfg)  # the embeddings now come from the disk cache alone
    short = cfg.override(**{"central.epochs": 2})
    train_central(short, p.split, p.item_emb, log=lambda _: None)
    model = build_model(cfg, p.item_emb.shape[1], p.split.n_items)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    local_update(cfg, p.item_emb, ClientData.from_split(p.split, 0), arrays, None, seed=0)


@pytest.mark.parametrize("kind", ["seq", "text"])
def test_the_proximal_gradient_is_the_proximal_loss_term_bit_for_bit(cfg, prepared, kind):
    """FedProx's term added to the gradients after backward (Proximal) takes the same
    SGD step, to the bit, as adding 0.5 * mu * ||w - w_global||^2 to the loss."""
    cfg = cfg.override(**{"model.kind": kind, "model.user-embedding": kind != "seq"})
    split, E = prepared.split, torch.from_numpy(prepared.item_emb)
    data = ClientData.from_split(split, 0)
    torch.manual_seed(0)
    start = build_model(cfg, E.shape[1], split.n_items)
    mu = 0.01
    after = []
    for use_proximal in (True, False):
        model = copy.deepcopy(start)
        global_w = [p.detach().clone() for p in model.parameters()]
        proximal = Proximal(model.parameters(), mu) if use_proximal else None  # at the global model
        with torch.no_grad():  # away from the global model, so the term is not zero
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        opt = make_optimizer(model, None, cfg)
        torch.manual_seed(1)
        if kind == "seq":
            loss = model.loss(E, torch.from_numpy(windows(data.history, model.max_len)),
                              torch.from_numpy(data.warm))
        else:
            h, b, _ = model.items(E, torch.arange(split.n_items))
            loss = (h.sum(1) + b).square().mean()
        if proximal is None:
            loss = loss + 0.5 * mu * sum(((p - s) ** 2).sum()
                                         for p, s in zip(model.parameters(), global_w))
        _step(opt, loss, proximal)
        after.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after))
    assert not all(torch.equal(a, b) for a, b in zip(after[0], start.parameters()))
