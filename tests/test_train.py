"""Training: one epoch for every model, central training learns the tiny data, FedProx's
term, and the frozen PLM never runs once the catalog is encoded."""

import copy

import numpy as np
import pytest
import torch

import fedrec.data.encoder
import fedrec.data.pipeline
from fedrec.data.evaluate import evaluate
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.federation.local import local_update
from fedrec.models.build import build_model
from fedrec.models.central import train_central
from fedrec.models.protocol import stack_rows, windows
from fedrec.models.train import Proximal, make_optimizer, scorer, train_epoch
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("isolated")


def val_hr(model, split, E, users=None):
    return evaluate(scorer(model, torch.from_numpy(E), users), split, "val")["sampled/hr@10"]


@pytest.mark.parametrize("seed", [0, 1])
def test_train_central_beats_the_untrained_model(cfg, prepared, seed):
    cfg = cfg.override(**{"train.seed": seed})
    split, E = prepared.split, prepared.item_emb
    torch.manual_seed(seed)  # train_central's own initialisation
    untrained = val_hr(build_model(cfg, E.shape[1], split.n_items), split, E)
    out = train_central(cfg, split, E, log=lambda _: None)
    curve = [c["val/sampled/hr@10"] for c in out["curve"]]
    assert max(curve) >= untrained + 0.2, (untrained, curve)
    # the returned model is the best-validation epoch's, by full-ranking HR@10 (SELECT)
    full = [c["val/full/hr@10"] for c in out["curve"]]
    assert full[out["best_epoch"] - 1] == max(full)
    assert val_hr(out["model"], split, E) == pytest.approx(curve[out["best_epoch"] - 1])
    for key in ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10", "full/cold/hr@10",
                "new-items/hr@10"):
        assert key in out["final"] and key in out["best"]


def test_train_central_is_deterministic(cfg, prepared):
    cfg = cfg.override(**{"central.epochs": 2})
    a = train_central(cfg, prepared.split, prepared.item_emb, log=lambda _: None)
    b = train_central(cfg, prepared.split, prepared.item_emb, log=lambda _: None)
    assert [c["loss"] for c in a["curve"]] == [c["loss"] for c in b["curve"]]


def test_fedmf_central_training_learns_its_user_vectors(tiny_root):
    cfg = tiny_config(tiny_root, {"model.kind": "fedmf", "central.epochs": 30,
                                  "central.lr": 0.05})
    p = prepare(cfg)
    assert p.item_emb.shape[1] == 0  # FedMF reads no text: nothing is encoded
    torch.manual_seed(cfg.train.seed)  # train_central's own initialisation
    untrained = val_hr(build_model(cfg, 0, p.split.n_items), p.split, p.item_emb,
                       torch.randn(p.split.n_users, cfg.model.dim) * 0.1)
    out = train_central(cfg, p.split, p.item_emb, log=lambda _: None)
    assert out["curve"][-1]["loss"] < out["curve"][0]["loss"]
    assert out["users"].shape == (p.split.n_users, cfg.model.dim)
    assert val_hr(out["model"], p.split, p.item_emb, out["users"]) >= untrained + 0.4

    def ndcg(users):  # the user vectors rank within the popular items the biases found
        s = scorer(out["model"], torch.from_numpy(p.item_emb), users)
        return evaluate(s, p.split, "val")["sampled/ndcg@10"]
    assert ndcg(out["users"]) > ndcg(torch.zeros_like(out["users"])) + 0.05


def test_one_epoch_reads_each_row_once_with_its_owners_user_vector(tiny_root):
    """A model with user vectors: a step's gradient reaches exactly its rows' owners."""
    cfg = tiny_config(tiny_root, {"model.kind": "fedmf"})
    p = prepare(cfg)
    model = build_model(cfg, 0, p.split.n_items)
    users = model.new_users(p.split.n_users).requires_grad_()
    rows, owner = stack_rows([p.split.history(u) for u in range(3)], model.max_len)
    before = users.detach().clone()
    opt = make_optimizer("sgd", 0.1, 0.0, model, users)
    train_epoch(model, opt, torch.zeros(p.split.n_items, 0), rows, torch.ones(p.split.n_items,
                dtype=torch.bool), len(rows), np.random.default_rng(0), users, owner)
    moved = (users.detach() != before).any(1)
    assert moved[:3].all() and not moved[3:].any()


def test_the_frozen_plm_never_runs_during_training(cfg, monkeypatch):
    from transformers import BertModel

    prepare(cfg)  # encodes the catalog once (or finds it in the on-disk cache)

    def forbidden(*args, **kwargs):
        raise AssertionError("the PLM ran during training")

    monkeypatch.setattr(fedrec.data.encoder.TextEncoder, "encode", forbidden)
    monkeypatch.setattr(BertModel, "forward", forbidden)
    fedrec.data.encoder._encoder.cache_clear()
    fedrec.data.pipeline._PREPARED.clear()
    p = prepare(cfg)  # the embeddings now come from the disk cache alone
    short = cfg.override(**{"central.epochs": 2})
    train_central(short, p.split, p.item_emb, log=lambda _: None)
    model = build_model(cfg, p.item_emb.shape[1], p.split.n_items)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    local_update(cfg, p.item_emb, ClientData.from_split(p.split, 0), arrays, None, seed=0)


def test_prepare_runs_once_per_process_for_the_same_data(cfg, tiny_root):
    a = prepare(cfg)
    assert prepare(cfg.override(**{"train.seed": 7, "fed.num-rounds": 3})) is a
    assert prepare(cfg.override(**{"data.split-seed": 1})) is not a


def test_the_proximal_gradient_is_the_proximal_loss_term_bit_for_bit(cfg, prepared):
    """FedProx's term added to the gradients after backward (Proximal) takes the same
    SGD step, to the bit, as adding 0.5 * mu * ||w - w_global||^2 to the loss."""
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
        opt = make_optimizer("sgd", 0.1, 0.0, model)
        rows = windows(data.history, model.max_len)
        torch.manual_seed(1)
        if proximal is None:  # the term in the loss itself: one step on the same row
            loss = model.loss(E, torch.from_numpy(rows), torch.from_numpy(data.warm))
            loss = loss + 0.5 * mu * sum(((p - s) ** 2).sum()
                                         for p, s in zip(model.parameters(), global_w))
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            train_epoch(model, opt, E, rows, torch.from_numpy(data.warm), len(rows),
                        np.random.default_rng(0), proximal=proximal)
        after.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after))
    assert not all(torch.equal(a, b) for a, b in zip(after[0], start.parameters()))
