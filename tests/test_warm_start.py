"""The public warm start (fedrec/models/warm_start.py): sessions from the catalog alone, the
ID vectors and unreleased items left out, and what the pretrained model then ranks."""

import numpy as np
import pytest
import torch
from test_seqrec import SEQ

from fedrec.config import FedrecError
from fedrec.data.datasets import item_terms
from fedrec.data.pipeline import prepare
from fedrec.models.build import build_model
from fedrec.models.central import train_central
from fedrec.models.warm_start import SESSION_LEN, sessions, warm_start
from fedrec.ranking.explain import scores
from tiny import genre_of, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")


def test_sessions_hold_released_items_that_share_one_catalog_term():
    fields = [{"title": f"t{i}", "genres": "A, B" if i < 6 else "C"} for i in range(10)]
    released = np.ones(10, bool)
    released[[2, 8]] = False
    out = sessions(fields, released, np.random.default_rng(0))
    assert len(out) == 2 * 8
    for s in out:
        assert 2 <= len(s) <= SESSION_LEN and len(set(s.tolist())) == len(s)
        assert released[s].all()
        terms = [{t for _, t in item_terms(fields[i])} for i in s]
        assert set.intersection(*terms)
    with pytest.raises(FedrecError, match="model.public-warm-start"):
        sessions([{"title": "x", "genres": "A"}, {"title": "y", "genres": "B"}],
                 np.ones(2, bool), np.random.default_rng(0))


def test_warm_start_learns_the_catalog_terms_and_leaves_id_vectors_alone(tiny_root):
    cfg = tiny_config(tiny_root, {**SEQ, "model.public-warm-start": 8})
    p = prepare(cfg)
    E = torch.from_numpy(p.item_emb)
    torch.manual_seed(0)
    model = build_model(cfg, p.item_emb.shape[1], p.split.n_items)
    ids = {n: v.clone() for n, v in model.state_dict().items() if n.startswith("id_")}
    adapter = {n: v.clone() for n, v in model.state_dict().items() if n.startswith("adapter")}

    def genre_share(m) -> float:
        """Share of the top-10 in the genre of a one-genre history, over both genres."""
        m.eval()
        h, b = m.item_table(E)
        genres = np.array([genre_of(i) for i in range(p.split.n_items)])
        shares = []
        for g in ("Comedy", "Horror"):
            hist = np.flatnonzero((genres == g) & p.split.released)[:6]
            s = scores(m, h, b, [hist])[0]
            s[torch.from_numpy(hist)] = -torch.inf
            shares.append(float((genres[torch.topk(s, 10).indices.numpy()] == g).mean()))
        return float(np.mean(shares))

    losses = warm_start(model, cfg, p.item_emb, p.dataset.item_fields, p.split.released,
                        log=lambda *_: None)
    assert len(losses) == 8 and losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[n], v) for n, v in ids.items())  # learned from users only
    assert any(not torch.equal(state[n], v) for n, v in adapter.items())
    assert genre_share(model) >= 0.9


def test_warm_start_is_a_public_seq_text_option(tiny_root):
    with pytest.raises(FedrecError, match="model.public-warm-start.*model.kind = 'seq'"):
        tiny_config(tiny_root, {"model.public-warm-start": 2, "model.kind": "fedmf"})
    with pytest.raises(FedrecError, match="model.public-warm-start.*fed.min-nodes"):
        tiny_config(tiny_root, {**SEQ, "model.public-warm-start": 2, "fed.min-nodes": 2})
    cfg = tiny_config(tiny_root, {**SEQ, "model.public-warm-start": 1, "central.epochs": 1})
    p = prepare(cfg)
    said = []
    train_central(cfg, p.split, p.item_emb, log=said.append, item_fields=p.dataset.item_fields)
    assert any("public warm start: epoch 1 of 1" in s for s in said)
