"""Models: Opacus-compatible layers, leave-one-out history pooling, the documented shapes."""

import pytest
import torch
from opacus.validators import ModuleValidator

from fedrec.models.build import FedMF, TextRec, init_local_users, pool_history

TEXT_DIM, N_ITEMS, DIM = 12, 9, 8


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def textrec(pooling="attention", id_embeddings=False):
    return TextRec(TEXT_DIM, N_ITEMS, dim=DIM, hidden=16, dropout=0.1, pooling=pooling,
                   id_embeddings=id_embeddings)


@pytest.mark.parametrize("model", [
    textrec("attention", False), textrec("attention", True), textrec("mean", False),
    textrec("mean", True), textrec("none", False), FedMF(N_ITEMS, DIM)],
    ids=["attn", "attn-id", "mean", "mean-id", "none", "fedmf"])
def test_opacus_accepts_every_model(model):
    # strict=True raises UnsupportedModuleError on any layer DP-SGD cannot handle.
    assert ModuleValidator.validate(model, strict=True) == []


def direct_pool(h, a, items):
    """Softmax(a)-weighted mean of h over `items`, computed the obvious way."""
    if len(items) == 0:
        return torch.zeros(h.shape[1], dtype=h.dtype)
    idx = torch.tensor(items)
    return (torch.softmax(a[idx], 0).unsqueeze(-1) * h[idx]).sum(0)


HISTORIES = [[0, 3, 5, 7], [1, 2], [4], [], [8, 6, 0]]  # segment 3 has no history


def flat(histories):
    items = torch.tensor([i for hist in histories for i in hist])
    seg = torch.tensor([s for s, hist in enumerate(histories) for _ in hist])
    return items, seg


@pytest.mark.parametrize("logits", ["random", "peaked", "mean"])
def test_pool_history_leave_one_out_equals_pooling_without_the_item(logits):
    h = torch.randn(N_ITEMS, DIM, dtype=torch.float64)
    a = {"random": torch.randn(N_ITEMS, dtype=torch.float64),
         # one item dominates its segment by far: subtracting it would cancel to ~0
         "peaked": torch.tensor([40.0, 0, 25, 1, 0, 2, -3, 0.5, 0], dtype=torch.float64),
         "mean": torch.zeros(N_ITEMS, dtype=torch.float64)}[logits]
    items, seg = flat(HISTORIES)
    rows = [(s, x) for s, hist in enumerate(HISTORIES) for x in hist + [-1]]
    rows_seg = torch.tensor([s for s, _ in rows])
    exclude = torch.tensor([x for _, x in rows])
    out = pool_history(h, a, items, seg, len(HISTORIES), rows_seg, exclude=exclude)
    assert out.shape == (len(rows), DIM)
    for r, (s, x) in enumerate(rows):
        rest = [i for i in HISTORIES[s] if i != x]
        torch.testing.assert_close(out[r], direct_pool(h, a, rest), rtol=1e-6, atol=1e-9,
                                   msg=f"segment {s} without item {x}")


def test_pool_history_float32_dominant_item_left_out():
    # The case that cancels catastrophically in float32 when done by subtraction.
    h = torch.randn(N_ITEMS, DIM)
    a = torch.zeros(N_ITEMS)
    a[0] = 30.0
    items, seg = flat([[0, 1, 2]])
    out = pool_history(h, a, items, seg, 1, torch.tensor([0]), exclude=torch.tensor([0]))
    torch.testing.assert_close(out[0], (h[1] + h[2]) / 2)


def test_pool_history_without_exclude_and_empty_pools():
    h = torch.randn(N_ITEMS, DIM)
    a = torch.randn(N_ITEMS)
    items, seg = flat(HISTORIES)
    out = pool_history(h, a, items, seg, len(HISTORIES), torch.arange(len(HISTORIES)))
    for s, hist in enumerate(HISTORIES):
        torch.testing.assert_close(out[s], direct_pool(h, a, hist))
    assert torch.equal(out[3], torch.zeros(DIM))  # no history at all
    # a one-item history with that item left out is empty too
    one = pool_history(h, a, items, seg, len(HISTORIES), torch.tensor([2]),
                       exclude=torch.tensor([4]))
    assert torch.equal(one, torch.zeros(1, DIM))


def test_pool_history_gradients_are_finite_and_skip_the_left_out_item():
    h = torch.randn(N_ITEMS, DIM, requires_grad=True)
    a = torch.tensor([30.0, 0, 1, 0, 0, 0, 0, 0, 0], requires_grad=True)
    items, seg = flat([[0, 1, 2]])
    out = pool_history(h, a, items, seg, 1, torch.tensor([0, 0]), exclude=torch.tensor([0, -1]))
    out[0].sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(a.grad).all()
    assert torch.equal(h.grad[0], torch.zeros(DIM)) and a.grad[0] == 0  # item 0 left out
    assert h.grad[1].abs().sum() > 0


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("id_embeddings", [False, True])
def test_textrec_shapes(pooling, id_embeddings):
    model = textrec(pooling, id_embeddings)
    idx = torch.tensor([0, 4, 4, 8, 2])
    h, b, a = model.items(torch.randn(len(idx), TEXT_DIM), idx)
    assert h.shape == (5, DIM) and b.shape == (5,) and a.shape == (5,)
    if pooling == "mean":
        assert torch.equal(a, torch.zeros(5))  # mean pooling = equal attention logits
    pooled = torch.randn(3, DIM)
    assert model.users(pooled, None).shape == (3, DIM)
    local = torch.randn(3, DIM)
    torch.testing.assert_close(model.users(pooled, local), model.users(pooled, None) + local)
    # Everything in the module is federated: no parameter is sized by the user count.
    names = {n for n, _ in model.named_parameters()}
    assert ("id_emb.weight" in names) == id_embeddings


@pytest.mark.parametrize("id_embeddings", [False, True])
def test_textrec_without_pooling_has_no_user_tower(id_embeddings):
    """pooling "none": h_u is the user-local vector; nothing of a user tower is uploaded."""
    model = textrec("none", id_embeddings)
    assert model.uses_history is False and textrec("mean").uses_history is True
    assert model.attention is None and model.user_adapter is None
    names = {n for n, _ in model.named_parameters()}
    assert all(n.startswith(("item_adapter.", "item_bias.", "id_emb.", "id_bias."))
               for n in names), names
    idx = torch.tensor([0, 4, 8])
    h, b, a = model.items(torch.randn(len(idx), TEXT_DIM), idx)
    assert h.shape == (3, DIM) and b.shape == (3,) and torch.equal(a, torch.zeros(3))
    local = torch.randn(2, DIM)
    assert model.users(None, local) is local


def test_fedmf_shapes_and_user_vector_is_the_local_one():
    model = FedMF(N_ITEMS, DIM)
    idx = torch.tensor([1, 1, 7])
    h, b, a = model.items(None, idx)
    assert h.shape == (3, DIM) and b.shape == (3,) and torch.equal(a, torch.zeros(3))
    torch.testing.assert_close(h, model.item_emb.weight[idx])
    local = torch.randn(2, DIM)
    assert model.users(None, local) is local
    assert set(model.state_dict()) == {"item_emb.weight", "item_bias.weight"}


def test_init_local_users():
    g = torch.Generator().manual_seed(0)
    mf = init_local_users(4, DIM, "fedmf", g)
    assert mf.shape == (4, DIM) and mf.abs().sum() > 0 and mf.std() < 0.2
    assert torch.equal(init_local_users(4, DIM, "text"), torch.zeros(4, DIM))
    # pooling "none": the local vector is the whole user vector, random like FedMF's
    none = init_local_users(4, DIM, "text", torch.Generator().manual_seed(0), pooling="none")
    assert torch.equal(none, mf)
