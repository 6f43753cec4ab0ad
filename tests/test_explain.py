"""Explanations and diversity: the deletion test on a hand-built model whose answer is
known, MMR and DPP at lambda 0 are the plain ranking (DPP's greedy checked against a direct
log det), list metrics on known vectors, and reasons that follow the history."""

from itertools import combinations

import numpy as np
import pytest
import torch

from fedrec.data.evaluate import Space, evaluate, item_novelty, top_k, unit_rows
from fedrec.models.protocol import batch_inputs
from fedrec.models.seqrec import SeqRec
from fedrec.ranking.diversity import dpp, lambda_curve, mmr
from fedrec.ranking.explain import deletion_test, loo_drops, pick_reasons, shared_terms


class SumModel:
    """A hand-built sequence model: the user state is the sum of the input's item vectors,
    so every score is a known sum. Items 0-5 are unit vectors e_0..e_5; item 6 = e0+e1+e2,
    item 7 = 0.9 (e3+e4+e5), item 8 = 0.5 (e0+e3), item 9 = 0."""

    max_len = 50

    def __init__(self):
        h = torch.zeros(10, 6)
        h[:6] = torch.eye(6)
        h[6, :3] = 1.0
        h[7, 3:] = 0.9
        h[8, [0, 3]] = 0.5
        self.h = h

    def eval(self):
        return self

    def item_table(self, E):
        return self.h, torch.zeros(10)

    def states(self, h, seq, user=None):
        x = torch.where((seq >= 0)[..., None], h[seq.clamp_min(0)], 0.0)
        return x.cumsum(1)


def test_deletion_test_on_a_model_with_a_known_answer():
    """History 0..5: the top-2 are item 6 (score 3) and item 7 (2.7); their reasons are
    {0,1,2} and {3,4,5}. Deleting {0,1,2} drops item 6 from rank 0 to 2 (below 7 and 8);
    deleting {3,4,5} drops item 7 from rank 1 to 2 (below 6 and 8). Random deletions of 3
    history items are enumerated exactly: item 6 falls by 1 with probability 9/20 (two of
    0,1,2 go) and by 2 with probability 1/20, 0.55 on average."""
    m = SumModel()
    seq = np.arange(6)
    top = torch.tensor([6, 7])
    reasons = pick_reasons(loo_drops(m, m.h, torch.zeros(10), seq, top))
    assert [sorted(r) for r in reasons] == [[0, 1, 2], [3, 4, 5]]

    def rank(kept, item):  # candidates: items 6-9 (the history is not a candidate)
        s = m.h[list(kept)].sum(0) @ m.h.T
        return int((s[6:] > s[item]).sum())

    random = [np.mean([rank(set(range(6)) - set(g), i) - rank(range(6), i)
                       for g in combinations(range(6), 3)]) for i in (6, 7)]
    assert random[0] == pytest.approx(0.55)
    res = deletion_test(m, torch.zeros(10, 1), [seq], k=2, n_random=400, seed=0)["summary"]
    assert res["rank-drop-reasons-mean"] == 1.5  # (2 + 1) / 2
    assert res["rank-drop-random-mean"] == pytest.approx(np.mean(random), abs=0.08)
    assert res["share-reasons-beat-random"] == np.mean([2 > random[0], 1 > random[1]])
    assert res["distinct-reason-sets-median"] == 2.0 and res["pairs"] == 2


def test_a_history_too_short_to_compare_is_skipped():
    m = SumModel()
    assert deletion_test(m, torch.zeros(10, 1), [np.arange(3)], k=2)["summary"]["users"] == 0


def test_mmr_with_lambda_zero_is_the_plain_ranking():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(7, 40))
    s[:, :3] = -np.inf  # excluded items never appear
    unit = Space.vectors(rng.normal(size=(40, 5)))
    plain = np.argsort(-s, axis=1, kind="stable")[:, :10]
    assert (mmr(s, unit, 10, 0.0) == plain).all() and (top_k(s, 10) == plain).all()
    for red in ("mean", "max"):
        lists = mmr(s, unit, 10, 0.3, redundancy=red)
        assert (lists[:, 0] == plain[:, 0]).all()            # the best item always stays first
        assert all(len(set(r)) == 10 and not set(r) & {0, 1, 2} for r in lists)


def test_mmr_replaces_a_near_duplicate_and_ild_rises():
    vecs = np.array([[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0]])
    s = np.array([[4.0, 3.9, 3.0, 2.0]])
    unit = Space.vectors(vecs)
    assert mmr(s, unit, 2, 0.0).tolist() == [[0, 1]]
    assert mmr(s, unit, 2, 0.5).tolist() == [[0, 2]]  # item 1 duplicates item 0
    ild = unit.ild(np.array([[0, 1], [0, 2]]))
    assert ild[0] == pytest.approx(0.0, abs=1e-3) and ild[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lambda"):
        mmr(s, unit, 2, 1.5)


def test_dpp_at_lambda_zero_is_the_plain_ranking_and_drops_a_near_duplicate():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(7, 40))
    s[:, :3] = -np.inf
    unit = Space.vectors(rng.normal(size=(40, 5)))  # 5 dimensions: volume runs out after 5 items
    plain = np.argsort(-s, axis=1, kind="stable")[:, :10]
    assert (dpp(s, unit, 10, 0.0) == plain).all()
    lists = dpp(s, unit, 10, 0.3)
    assert (lists[:, 0] == plain[:, 0]).all()
    assert all(len(set(r)) == 10 and not set(r) & {0, 1, 2} for r in lists)
    vecs = np.array([[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0]])
    near = np.array([[4.0, 3.9, 3.0, 2.0]])
    assert dpp(near, Space.vectors(vecs), 2, 0.5).tolist() == [[0, 2]]
    with pytest.raises(ValueError, match="lambda"):
        dpp(near, Space.vectors(vecs), 2, -0.1)


def test_dpp_greedy_steps_maximise_the_log_determinant():
    """Each pick of the incremental-Cholesky greedy is the argmax of log det L over the
    list so far plus one candidate, computed directly."""
    rng = np.random.default_rng(2)
    s, vecs = rng.normal(size=(5, 12)), unit_rows(rng.normal(size=(12, 8)))
    lam, k = 0.4, 6
    lists = dpp(s, Space.vectors(vecs), k, lam)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = p ** ((1 - lam) / (2 * lam))
    for u in range(len(s)):
        L = q[u][:, None] * (vecs @ vecs.T) * q[u][None]
        picked = []
        for _ in range(k):
            logdet = [np.linalg.slogdet(L[np.ix_(picked + [i], picked + [i])])[1]
                      if i not in picked else -np.inf for i in range(12)]
            picked.append(int(np.argmax(logdet)))
        assert lists[u].tolist() == picked


def test_novelty_is_minus_log2_of_the_smoothed_popularity():
    assert item_novelty(np.array([0, 1, 3]), 3).tolist() == pytest.approx(
        [2.0, 1.0, 0.0])


def test_evaluation_reports_diversity_and_lambda_zero_matches_its_hr(tiny_split):
    split, vecs = tiny_split
    rng = np.random.default_rng(1)
    table = rng.normal(size=(split.n_users, split.n_items))
    score = lambda users, inputs: table[users]
    spaces = {"plm": Space.vectors(vecs)}
    m = evaluate(score, split, spaces=spaces)
    assert {"div/ild@10", "div/coverage@10", "div/novelty@10"} <= set(m)
    assert 0 < m["div/coverage@10"] <= 1 and 0 < m["div/ild@10"] < 2
    curve = lambda_curve(score, split, spaces, [0.0, 0.5])
    assert curve[0]["full/hr@10"] == pytest.approx(m["full/hr@10"])
    assert curve[0]["div/ild@10"] == pytest.approx(m["div/ild@10"])
    assert curve[1]["div/ild@10"] > curve[0]["div/ild@10"]


def test_reasons_follow_the_history():
    """The same recommended item is explained by other items when the history changes,
    and a reason is always an item of the model's input window."""
    torch.manual_seed(0)
    m = SeqRec(12, 30, dim=16, hidden=16, layers=2, heads=2, max_len=6, dropout=0.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m.eval()
    E = torch.randn(30, 12)
    h, b = m.item_table(E)
    item = torch.tensor([29])
    a, c = np.array([1, 2, 3, 4, 5, 6, 7, 8]), np.array([10, 11, 12, 13, 14, 15])
    ra = [int(a[-6:][j]) for j in pick_reasons(loo_drops(m, h, b, a, item))[0]]
    rc = [int(c[j]) for j in pick_reasons(loo_drops(m, h, b, c, item))[0]]
    assert set(ra) <= set(a[-6:]) and set(rc) <= set(c) and ra != rc
    # The drops are exact leave-one-out score differences.
    drop = loo_drops(m, h, b, c, item)[2, 0]
    s = lambda seq: float(m.score_pairs(E, batch_inputs([seq], 6), item[None])[0, 0].detach())
    assert float(drop) == pytest.approx(s(c) - s(np.delete(c, 2)), abs=1e-5)


def test_shared_terms_name_the_genres_an_item_has_in_common_with_its_reasons():
    item = {"title": "Fantasia", "year": "1940", "genres": "Animation, Children's, Musical"}
    reasons = [{"title": "Aristocats", "genres": "Animation|Children's"},
               {"title": "Heat", "genres": "Action"}]
    assert shared_terms(item, reasons) == ["Animation", "Children's"]
    assert shared_terms({"title": "Heat"}, reasons) == []


@pytest.fixture
def tiny_split():
    """A protocol split over random data and random item vectors (no files)."""
    from fedrec.data.protocol import _compute_split

    rng = np.random.default_rng(0)
    n_users, n_items = 40, 60
    users = np.repeat(np.arange(n_users), 12)
    items = np.concatenate([rng.choice(n_items, 12, replace=False) for _ in range(n_users)])
    split = _compute_split(_FakeDs(users, items, n_users, n_items), 0.1, 0, 20)
    return split, rng.normal(size=(n_items, 8))


class _FakeDs:
    """What _compute_split reads of a Dataset: interactions sorted by user, in time order."""

    def __init__(self, users, items, n_users, n_items):
        self.users, self.items, self.n_users, self.n_items = users, items, n_users, n_items
        self.times = np.arange(len(items))


def test_random_list_ild_is_one_minus_the_mean_cosine_over_distinct_pairs():
    from fedrec.ranking.diversity import random_list_ild

    u = unit_rows(np.random.default_rng(0).normal(size=(30, 4)))
    cos = u @ u.T
    assert random_list_ild(Space.vectors(u)) == pytest.approx(1 - (cos.sum() - 30) / (30 * 29))


def test_genre_space_measures_ild_by_jaccard_and_without_spaces_there_is_no_ild(tiny_split):
    genres = Space.sets([{"a", "b"}, {"a"}, {"c"}, set()])
    # Jaccard: {a,b}~{a} = 1/2, {a,b}~{c} = 0, {a}~{c} = 0; an empty set is like nothing.
    assert genres.ild(np.array([[0, 1], [0, 2], [2, 3]])).tolist() == pytest.approx(
        [0.5, 1.0, 1.0])
    assert genres.ild(np.array([[0, 1, 2]]))[0] == pytest.approx(1 - (0.5 * 2) / 6)
    lists = np.array([[0, 1], [1, 0]])
    assert genres.ild(lists)[0] == genres.ild(lists)[1]  # order within a list is irrelevant
    split, _ = tiny_split
    table = np.random.default_rng(2).normal(size=(split.n_users, split.n_items))
    m = evaluate(lambda users, inputs: table[users], split)
    assert not any(k.startswith("div/ild") or "genre" in k for k in m)
    assert "div/coverage@10" in m


def test_centred_space_removes_the_shared_direction():
    """Raw vectors sharing a large common component look alike (ILD near 0); centring on
    the catalog mean restores their spread."""
    rng = np.random.default_rng(3)
    v = rng.normal(size=(50, 6)) + 20.0
    lists = rng.integers(0, 50, size=(40, 10))
    raw, centred = Space.vectors(v).ild(lists), Space.vectors(v, centred=True).ild(lists)
    assert np.nanmean(raw) < 0.05 and np.nanmean(centred) > 0.5
