"""The sequence model (fedrec/models/seqrec.py): causality, padding, the released-items
softmax, windows, and training on the tiny data."""

import numpy as np
import pytest
import torch

from fedrec.config import FedrecError
from fedrec.data.evaluate import evaluate
from fedrec.data.protocol import ClientData
from fedrec.federation.local import local_evaluate, local_update
from fedrec.models.build import build_model
from fedrec.models.central import train_central
from fedrec.models.protocol import PAD, batch_inputs, last_items, target_mask, windows
from fedrec.models.seqrec import SeqRec
from fedrec.models.train import scorer
from tiny import holding, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")
SEQ = {}  # the tiny config is the sequence model's


def _model(n_items=20, text_dim=12, **kw) -> SeqRec:
    torch.manual_seed(0)
    m = SeqRec(text_dim, n_items, dim=16, hidden=16, layers=2, heads=2, max_len=6, dropout=0.0,
               **kw)
    with torch.no_grad():  # give the zero-initialised parts values, so every path matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("stride", [1, 2, 3, 6])
def test_windows_make_every_item_after_the_first_a_target_exactly_once(stride):
    """With the loss counting from position L - stride (target_mask), every item after
    the first is a target once, read with min(its position, L - stride + 1) or more items
    of context; stride = L is the disjoint cut."""
    L = 6
    for n in (0, 1, 2, 5, 6, 7, 13, 20):
        h = np.arange(100, 100 + n)
        w = windows(h, L, stride)
        keep = target_mask(torch.from_numpy(w), L - stride).numpy()
        targets = w[:, 1:][keep]
        assert sorted(targets.tolist()) == h[1:].tolist()
        assert w.shape[1] == L + 1
        context = (w[:, :-1] != PAD).cumsum(1)[keep]  # items read before each target
        assert (context >= np.minimum(targets - 100, L - stride + 1)).all()
        for row in w:  # each window is a contiguous run of the history, left-padded
            real = row[row != PAD]
            assert (np.diff(real) == 1).all() and (row[:len(row) - len(real)] == PAD).all()
    assert len(windows(np.arange(20), L, 1)) == 19 and len(windows(np.arange(20), L)) == 4


def test_last_items_pads_left_and_keeps_the_most_recent():
    assert last_items(np.array([1, 2, 3]), 5).tolist() == [PAD, PAD, 1, 2, 3]
    assert last_items(np.arange(10), 4).tolist() == [6, 7, 8, 9]


def test_encoder_is_causal_and_padding_does_not_change_scores():
    m, E = _model(), torch.randn(20, 12)
    h, _ = m.item_table(E)
    seq = torch.tensor([[3, 5, 7, 9, 11, 13]])
    changed = seq.clone()
    changed[0, 4:] = torch.tensor([1, 2])
    a, b = m.states(h, seq), m.states(h, changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    short = torch.tensor([[PAD, PAD, PAD, 9, 11, 13]])
    longer_pad = batch_inputs([np.array([9, 11, 13])], 6)
    assert torch.equal(short, longer_pad)
    # The same history in a shorter window (less padding) scores the same.
    m2 = _model()
    s6 = m2.score_all(E, short)
    m2.max_len = 6
    s3 = m2.score_all(E, torch.tensor([[9, 11, 13]]))
    assert torch.allclose(s6, s3, atol=1e-5)


def test_unreleased_items_get_no_gradient_from_the_softmax():
    m, E = _model(), torch.randn(20, 12)
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[[4, 15]] = False
    seq = torch.tensor([[PAD, 1, 2, 3, 5, 6, 7], [0, 8, 9, 10, 11, 12, 13]])
    m.train()
    m.loss(E, seq, allowed).backward()
    g = m.id_emb.weight.grad
    assert g[[4, 15]].abs().sum() == 0 and m.id_bias.weight.grad[[4, 15]].abs().sum() == 0
    assert (g[[1, 2, 3, 8]].abs().sum(1) > 0).all()


def test_id_only_model_reads_no_text_and_hybrid_ids_start_at_zero():
    ids = SeqRec(0, 10, dim=8, hidden=8, layers=1, heads=1, max_len=4, item_text=False)
    assert ids.adapter is None and ids.id_emb.weight.abs().sum() > 0
    h, _ = ids.item_table(torch.zeros(10, 0))
    assert h.shape == (10, 8)
    hybrid = SeqRec(12, 10, dim=8, hidden=8, layers=1, heads=1, max_len=4)
    assert hybrid.id_emb.weight.abs().sum() == 0  # a never-trained item: its text alone
    with pytest.raises(ValueError):
        SeqRec(12, 10, item_text=False, id_embeddings=False)


def test_config_rejects_settings_seq_cannot_honour(tiny_root):
    with pytest.raises(FedrecError, match="model.heads"):
        tiny_config(tiny_root, {**SEQ, "model.dim": 32, "model.heads": 3})
    with pytest.raises(FedrecError, match="item-text"):
        tiny_config(tiny_root, {**SEQ, "model.item-text": False, "model.id-embeddings": False})
    with pytest.raises(FedrecError, match="FedProx"):
        tiny_config(tiny_root, {**SEQ, "privacy.mode": "sample", "fed.strategy": "fedprox"})


def test_central_seq_training_beats_the_untrained_model(tiny_root):
    from fedrec.data.pipeline import prepare

    cfg = tiny_config(tiny_root, {**SEQ, "central.epochs": 15})
    p = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg, p.item_emb.shape[1], p.split.n_items)
    before = evaluate(scorer(untrained, torch.from_numpy(p.item_emb)), p.split, "test")
    res = train_central(cfg, p.split, p.item_emb, log=lambda *_: None)
    assert res["curve"][-1]["loss"] < res["curve"][0]["loss"]
    assert res["best"]["sampled/hr@10"] > before["sampled/hr@10"]


def test_central_reference_ignores_the_devices_optimizer(tiny_root):
    """central.optimizer, not train.optimizer, trains the reference (the regression that
    broke `make run`: the device's SGD at Adam's learning rate)."""
    from fedrec.data.pipeline import prepare

    runs = []
    for device_opt in ("sgd", "adam"):
        cfg = tiny_config(tiny_root, {**SEQ, "central.epochs": 2, "train.optimizer": device_opt})
        p = prepare(cfg)
        runs.append(train_central(cfg, p.split, p.item_emb, log=lambda *_: None)["curve"])
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


def test_device_update_trains_only_released_items_and_uploads_no_plm(tiny_root):
    from fedrec.data.pipeline import prepare

    cfg = tiny_config(tiny_root, SEQ)
    p = prepare(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, p.item_emb.shape[1], p.split.n_items)
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    user = int(np.flatnonzero(np.diff(p.split.train_ptr) > 4)[0])
    data = ClientData.from_split(p.split, user)
    params, local, metrics = local_update(cfg, p.item_emb, data, arrays, None, seed=1)
    assert set(params) == set(arrays) and local == {}
    assert metrics["num-examples"] == len(data.history)
    cold = np.flatnonzero(p.split.cold)
    assert len(cold)
    for name in ("id_emb.weight", "id_bias.weight"):
        assert np.array_equal(params[name][cold], arrays[name][cold])  # never trained on
    moved = [k for k in params if not np.allclose(params[k], arrays[k])]
    assert "adapter.proj.weight" in moved and "blocks.0.attn.qkv.weight" in moved
    for i in data.history[:5]:  # no row of the frozen text table travels
        assert holding(params, p.item_emb[i]) == []
    out = local_evaluate(cfg, p.item_emb, data, params, None, seed=1)
    assert out["num-examples"] == 1 and out["sampled/hr@10"] in (0.0, 1.0)


def test_recommend_with_the_seq_model_names_reasons_that_lower_the_score(tmp_path):
    """fedrec recommend on a v2 run: unseen items, best first; each reason is a history item
    whose removal from the input lowers that item's score by the weight shown."""

    import tiny
    from fedrec.data.device import read_catalog, write_device_dir
    from fedrec.ranking.recommend import recommend

    root = tiny.build(tmp_path)
    cfg = tiny_config(root, SEQ)
    run = tiny.write_run(root, cfg, scale=0.05, seed=1)  # away from zero IDs and residuals
    hist = ["1", "4", "7", "10", "13"]
    dev = write_device_dir(root / "device", read_catalog(root / "data"), hist, [1, 2, 3, 4, 5])
    recs = recommend(dev / "history.csv", run, k=5)
    assert [r.rank for r in recs] == [1, 2, 3, 4, 5] and not {r.item for r in recs} & set(hist)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    assert all(r.because[0][0] in hist for r in recs)
    top = next(r for r in recs if r.because[0][2] > 0)  # an item some history item lifts
    reason, _, drop = top.because[0]
    # Removing that item from the history lowers the top item's score by `drop`.
    fewer = [h for h in hist if h != reason]
    dev2 = write_device_dir(root / "device2", read_catalog(root / "data"), fewer,
                            list(range(len(fewer))))
    again = {r.item: r.score for r in recommend(dev2 / "history.csv", run, k=tiny.N_ITEMS)}
    logit = lambda p: float(np.log(p / (1 - p)))
    assert logit(top.score) - logit(again[top.item]) == pytest.approx(drop, rel=1e-3, abs=1e-4)


def test_padding_targets_never_make_the_loss_infinite():
    m, E = _model(), torch.randn(20, 12)
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[0] = False  # padding's stand-in target (index 0) is not allowed
    seq = torch.tensor([[PAD, PAD, PAD, PAD, 1, 2, 3]])
    m.train()
    loss = m.loss(E, seq, allowed)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters()
                                        if p.grad is not None)


def test_an_item_without_a_trained_id_row_is_scored_through_its_text_alone():
    m, E = _model(), torch.randn(20, 12)
    with torch.no_grad():  # trained-looking ID rows, so leaving them out shows
        m.id_emb.weight.normal_()
        m.id_bias.weight.normal_()
    known = np.ones(20, bool)
    known[[3, 7]] = False
    h_all, b_all = m.item_table(E)
    m.know(known)
    h, b = m.item_table(E)
    text_h, text_b = m.adapter(E), m.text_bias(E).squeeze(-1)
    assert torch.allclose(h[[3, 7]], text_h[[3, 7]]) and torch.allclose(b[[3, 7]], text_b[[3, 7]])
    assert torch.equal(h[known], h_all[known]) and torch.equal(b[known], b_all[known])
    assert "_known" not in dict(m.named_buffers())
    assert "id_from_text.weight" in m.state_dict()
    # An unknown item's ID rows get no gradient (never a target, never read); the map is
    # trained only where a known item is ID-dropped (DropoutNet-style), in training only.
    seq = torch.tensor([[PAD, 1, 2, 3, 4, 5, 6], [0, 8, 9, 10, 11, 12, 13]])
    m.train()
    m.loss(E, seq).backward()
    assert m.id_emb.weight.grad[[3, 7]].abs().sum() == 0
    assert m.id_emb.weight.grad[known].abs().sum() > 0
    assert m.id_from_text.weight.grad is None or m.id_from_text.weight.grad.abs().sum() == 0
    d = _model(id_dropout=0.5)
    d.train()
    torch.manual_seed(0)
    h_d = d.item_table(E)[0]
    g = d.id_from_text(E)
    text_h = d.adapter(E)
    stood_in = torch.isclose(h_d, text_h + g[:, :-1]).all(1)
    assert 0 < int(stood_in.sum()) < 20  # some items seen through the map's stand-in
    d.loss(E, seq).backward()
    assert d.id_from_text.weight.grad.abs().sum() > 0
    d.eval()
    assert torch.equal(d.item_table(E)[0], d.item_table(E)[0])


def test_new_item_bias_lifts_only_items_without_a_trained_id_row():
    E, known = torch.randn(20, 12), np.ones(20, bool)
    known[[3, 7]] = False
    plain = _model().know(known)
    lifted = _model(new_item_bias=0.75).know(known)
    (h0, b0), (h1, b1) = plain.item_table(E), lifted.item_table(E)
    assert torch.equal(h0, h1)
    assert torch.allclose(b1 - b0, torch.from_numpy(~known).float() * 0.75)
    # An ID-dropped known item in training reads the map but is not a new item: no offset.
    d0, d1 = _model(id_dropout=0.9), _model(id_dropout=0.9, new_item_bias=0.75)
    torch.manual_seed(1)
    d0.train()
    bd0 = d0.item_table(E)[1]
    torch.manual_seed(1)
    d1.train()
    assert torch.equal(d1.item_table(E)[1], bd0)
    # IDs alone have no text to stand in: the offset does not apply.
    assert _model(item_text=False, new_item_bias=0.75).new_item_bias == 0.0
