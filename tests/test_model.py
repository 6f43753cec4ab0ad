"""The model protocol (fedrec/models/protocol.py) for every model kind: Opacus-compatible
layers, the documented shapes, the three questions agreeing with each other and with a
hand-computed loss, and the user-local vector staying outside the module."""

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedrec.models.build import build_model, id_tables, model_from_arrays
from fedrec.models.fedmf import FedMF
from fedrec.models.protocol import PAD, batch_inputs, blocks, stack_rows, target_mask
from fedrec.models.seqrec import SeqRec
from tiny import tiny_config

TEXT_DIM, N_ITEMS, DIM = 12, 9, 8


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def models():
    seq = SeqRec(TEXT_DIM, N_ITEMS, dim=DIM, hidden=16, layers=2, heads=2, max_len=5,
                 dropout=0.0, id_dropout=0.3)
    with torch.no_grad():  # give the zero-initialised parts values, so every path matters
        for p in seq.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return [seq.eval(), FedMF(N_ITEMS, DIM, max_len=5).eval()]


@pytest.mark.parametrize("model", models(), ids=["seq", "fedmf"])
def test_opacus_accepts_every_model(model):
    # strict=True raises UnsupportedModuleError on any layer DP-SGD cannot handle.
    assert ModuleValidator.validate(model.train(), strict=True) == []


@pytest.mark.parametrize("model", models(), ids=["seq", "fedmf"])
def test_the_three_questions_agree_with_each_other_and_a_hand_computed_loss(model):
    E = torch.randn(N_ITEMS, TEXT_DIM)
    user = model.new_users(3, torch.Generator().manual_seed(1))
    assert user.shape == (3, model.user_dim)
    seq = torch.tensor([[PAD, PAD, 1, 4, 2, 7], [3, 1, 4, 1, 5, 8], [PAD, PAD, PAD, PAD, 6, 0]])
    every = model.score_all(E, seq[:, :-1], user)
    assert every.shape == (3, N_ITEMS)
    cand = torch.tensor([[0, 3], [8, 8], [2, 5]])
    torch.testing.assert_close(model.score_pairs(E, seq[:, :-1], cand, user),
                               every.gather(1, cand))
    h, b = model.item_table(E)
    assert h.shape == (N_ITEMS, DIM) and b.shape == (N_ITEMS,)
    # the loss by hand: each counted target against every item's score at its position
    allowed = torch.ones(N_ITEMS, dtype=torch.bool)
    allowed[[5]] = False
    total, count = 0.0, 0
    for r in range(3):
        for t in range(seq.shape[1] - 1):
            if seq[r, t] >= 0 and seq[r, t + 1] >= 0:
                s = model.score_all(E, seq[r:r + 1, :t + 1], user[r:r + 1])[0]
                s = s.masked_fill(~allowed, -math.inf)
                total += float(torch.logsumexp(s, 0) - s[seq[r, t + 1]])
                count += 1
    assert count == int(target_mask(seq).sum())
    got = model.loss(E, seq, allowed, user=user)
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    rows = model.loss(E, seq, allowed, reduction="row", user=user)
    assert float(rows.sum()) == pytest.approx(total, rel=1e-5)


def test_fedmf_reads_no_history_and_its_user_vector_stays_outside_the_module():
    model = FedMF(N_ITEMS, DIM)
    user = model.new_users(2)
    h, _ = model.item_table(None, torch.tensor([1, 1, 7]))
    torch.testing.assert_close(h, model.item_emb.weight[[1, 1, 7]])
    a = model.score_all(None, torch.tensor([[1, 2], [3, 4]]), user)
    torch.testing.assert_close(a, model.score_all(None, torch.tensor([[5, 6], [PAD, 0]]), user))
    assert set(model.state_dict()) == {"item_emb.weight", "item_bias.weight"}
    assert SeqRec(TEXT_DIM, N_ITEMS).new_users(4).shape == (4, 0)


def test_blocks_are_disjoint_and_cover_every_item_but_the_dropped_singleton():
    for n in (0, 1, 2, 6, 7, 12, 13):
        h = np.arange(100, 100 + n)
        b = blocks(h, 5)
        items = b[b != PAD]
        assert len(set(items.tolist())) == len(items)  # no item in two rows
        assert set(items.tolist()) == set(h.tolist()) - ({int(h[-1])} if n % 6 == 1 else set())


def test_stack_rows_names_each_rows_history():
    rows, owner = stack_rows([np.arange(3), np.arange(0), np.arange(12)], 5)
    assert rows.shape == (1 + 3, 6) and owner.tolist() == [0, 2, 2, 2]


def test_model_from_arrays_round_trips_and_knows_the_id_tables(tiny_root):
    for kind in ("seq", "fedmf"):
        cfg = tiny_config(tiny_root, {"model.kind": kind})
        model = build_model(cfg, 32, 60)
        arrays = {k: v.numpy() for k, v in model.state_dict().items()}
        again = model_from_arrays(cfg, 32, 60, arrays)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
        assert any(k.startswith(id_tables(cfg)) for k in arrays)
        assert not again.training
    with pytest.raises(RuntimeError):
        model_from_arrays(cfg, 32, 61, arrays)


def test_batch_inputs_pad_left():
    assert batch_inputs([np.array([1, 2])], 4).tolist() == [[PAD, PAD, 1, 2]]
