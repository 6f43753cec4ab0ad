"""The evaluation protocol (docs/protocol.md): the split, the candidates, and exact metric values."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.data import protocol
from fedrec.data.datasets import Dataset
from fedrec.data.evaluate import evaluate
from fedrec.data.protocol import Split, make_split
from fedrec.errors import FedrecError

KEYS = ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10", "full/cold/hr@10",
        "full/warm/hr@10", "sampled/cold/hr@10", "new-items/hr@10", "top10/unreleased-share")


@pytest.fixture(autouse=True)
def fedrec_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    return tmp_path


def dataset(rows, n_items, name="toy"):
    """Dataset from (user, item, time) rows, in the readers' order (user, time)."""
    rows = sorted(rows, key=lambda r: (r[0], r[2], r[1]))
    u, i, t = (np.array(c) for c in zip(*rows))
    n_users = int(u.max()) + 1
    return Dataset(name, [str(x) for x in range(n_users)], [str(x) for x in range(n_items)],
                   [{"title": f"item {x}"} for x in range(n_items)],
                   u.astype(np.int64), i.astype(np.int64), t.astype(np.float64))


TOY = dataset([(0, 5, 30), (0, 1, 10), (0, 7, 40), (0, 3, 20),   # times out of file order
               (1, 2, 1), (1, 4, 2),                              # 2 interactions
               (2, 0, 5), (2, 6, 6), (2, 8, 7)], n_items=10)


def test_leave_one_out_by_time():
    s = make_split(TOY, 0.0, 0, 3)
    assert s.history(0).tolist() == [1, 3] and (s.val[0], s.test[0]) == (5, 7)
    assert s.history(1).tolist() == [2, 4] and (s.val[1], s.test[1]) == (-1, -1)
    assert s.history(2).tolist() == [0] and (s.val[2], s.test[2]) == (6, 8)
    assert s.eval_users("test").tolist() == [0, 2] == s.eval_users("val").tolist()
    assert s.train_users.tolist() == [0, 0, 1, 1, 2]








def test_eval_negatives_are_unseen_fixed_and_cached(fedrec_home, monkeypatch):
    rng = np.random.default_rng(3)
    rows = [(u, int(i), t) for u in range(20)
            for t, i in enumerate(rng.choice(60, size=10, replace=False))]
    ds = dataset(rows, 60)
    first = make_split(ds, 0.1, 7, 20)
    for u in range(ds.n_users):
        seen = set(ds.items[ds.users == u].tolist())
        for negs in (first.val_negatives[u], first.test_negatives[u]):
            assert len(set(negs.tolist())) == 20 and not seen & set(negs.tolist())
    files = list((fedrec_home / "splits").glob("toy-*.npz"))
    assert len(files) == 1 and not list((fedrec_home / "splits").glob(".*"))
    before = files[0].read_bytes()
    monkeypatch.setattr(protocol, "_compute_split", lambda *a: pytest.fail("not cached"))
    second = make_split(ds, 0.1, 7, 20)
    assert files[0].read_bytes() == before
    for name in ("train_ptr", "train_items", "val", "test", "cold", "val_negatives",
                 "test_negatives"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    monkeypatch.undo()
    fresh = make_split(ds, 0.1, 7, 20, cache_dir=str(fedrec_home / "elsewhere"))
    assert np.array_equal(fresh.test_negatives, first.test_negatives)  # seeded, not luck


def test_corrupt_split_cache_is_recomputed(fedrec_home):
    good = make_split(TOY, 0.0, 0, 3)
    (path,) = (fedrec_home / "splits").glob("*.npz")
    path.write_bytes(b"not a zip")
    again = make_split(TOY, 0.0, 0, 3)
    assert np.array_equal(again.test_negatives, good.test_negatives)


def hand_split() -> Split:
    """12 items; user 0 warm test item, user 1 cold test item, user 2 train only."""
    k = 4
    return Split(
        n_items=12,
        train_ptr=np.array([0, 2, 3, 4]), train_items=np.array([0, 1, 4, 7]),
        val=np.array([2, 5, -1]), test=np.array([3, 11, -1]),
        cold=np.isin(np.arange(12), [11]),
        val_negatives=np.array([[7, 8, 9, 10], [6, 7, 8, 9], [-1] * k]),
        test_negatives=np.array([[4, 5, 6, -1], [0, 1, 2, 3], [-1] * k]))


SCORES = np.array([
    [9, 8, 0.5, 5, 6, 1, 2, 3, 4, 7, 0, 0.1],  # user 0: test item 3 scores 5
    [3, 3, 3, 3, 10, 0, 0, 0, 0, 0, 0, 3],     # user 1: test item 11 ties its negatives
    [0] * 12], dtype=np.float64)


def scorer(asked, inputs=None):
    def score(users, histories):
        asked.extend(users.tolist())
        if inputs is not None:
            inputs.extend(h.tolist() for h in histories)
        return SCORES[users]
    return score


def test_test_input_holds_the_validation_item_and_it_is_no_full_candidate():
    inputs = []
    evaluate(scorer([], inputs), hand_split(), "val")
    assert inputs == [[0, 1], [4]]
    inputs.clear()
    scores = SCORES.copy()
    scores[0, 2] = 100.0  # user 0's validation item, far above its test item
    m = evaluate(lambda u, h: (inputs.extend(x.tolist() for x in h), scores[u])[1],
                 hand_split(), "test")
    assert inputs == [[0, 1, 2], [4, 5]]  # the past at test time: train + validation item
    # Full ranking excludes the input's items: user 0's test rank stays 2 (items 4, 9).
    assert m["full/ndcg@10"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(6)) / 2)


@pytest.mark.parametrize("chunk", [1, 512])
def test_evaluate_exact_values(chunk):
    asked = []
    m = evaluate(scorer(asked), hand_split(), "test", chunk=chunk)
    assert sorted(asked) == [0, 1]  # the train-only user is never evaluated
    # sampled ranks: user 0 -> 1 (item 4 above; -1 padding ignored), user 1 -> 4 (ties)
    # full ranks: user 0 -> 2 (items 4, 9; its training items 0, 1 scoring 9, 8 are
    # excluded), user 1 -> 4 (items 0-3 tie; training item 4 at 10 excluded)
    assert m["sampled/hr@10"] == 1.0
    assert m["sampled/ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / 2)
    assert m["sampled/mrr"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert m["sampled/auc"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["full/hr@10"] == 1.0
    assert m["full/ndcg@10"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(6)) / 2)
    # user 1's test item (11) is the cold one: full rank 4, sampled rank 4; user 0 warm.
    assert m["full/cold/hr@10"] == 1.0 and m["cold/users"] == 1
    assert m["full/cold/ndcg@10"] == m["sampled/cold/ndcg@10"] == pytest.approx(1 / math.log2(6))
    assert m["full/warm/ndcg@10"] == pytest.approx(1 / math.log2(4)) and m["warm/users"] == 1
    assert m["sampled/warm/ndcg@10"] == pytest.approx(1 / math.log2(3))
    # Among the unreleased items alone, 11 has no rival: rank 0.
    assert m["new-items/hr@10"] == 1.0 and m["new-items/ndcg@10"] == 1.0
    # Each user's top-10 of the 10 items outside the input holds item 11 (plus the
    # excluded input items at -inf filling user 0's list): 1 in 10.
    assert m["top10/unreleased-share"] == pytest.approx(0.1)
    assert m["users"] == 2 and all(key in m for key in KEYS)
    m2 = evaluate(scorer([]), hand_split(), "test", k=2, chunk=chunk)
    assert (m2["sampled/hr@2"], m2["full/hr@2"], m2["full/cold/hr@2"],
            m2["sampled/warm/hr@2"], m2["new-items/hr@2"]) == (0.5, 0.0, 0.0, 1.0, 1.0)


def test_cold_metrics_credit_only_what_the_full_ranking_earns():
    """A scorer that puts every never-trained item above every trained one (a constant
    plus noise) looks perfect on the sampled cold column, whose few negatives are mostly
    released items; in the full ranking a cold target competes with every other unreleased
    item, and the cold metric is exactly the share of cold users whose target makes the
    brute-force top 10."""
    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(120)
            for t, i in enumerate(rng.choice(100, size=12, replace=False))]
    split = make_split(dataset(rows, 100), 0.3, 0, 20)
    noise = rng.normal(size=(split.n_users, split.n_items))
    table = noise + 100.0 * split.cold
    m = evaluate(lambda users, _: table[users], split)
    cold_users = [u for u in split.eval_users("test") if split.cold[split.test[u]]]
    assert m["cold/users"] == len(cold_users) > 10
    hits = []
    for u in cold_users:
        s = table[u].copy()
        s[split.eval_history(u, "test")] = -np.inf
        hits.append(split.test[u] in np.argsort(-s, kind="stable")[:10])
    assert m["full/cold/hr@10"] == pytest.approx(np.mean(hits))
    assert m["sampled/cold/hr@10"] == 1.0 and m["full/cold/hr@10"] < 0.6
    assert m["new-items/hr@10"] == pytest.approx(m["full/cold/hr@10"])  # cold above all
    assert m["top10/unreleased-share"] == 1.0
    assert m["full/warm/hr@10"] == 0.0  # ten cold items above every warm target


def test_a_constant_scorer_earns_nothing_in_the_cold_columns():
    rng = np.random.default_rng(1)
    rows = [(u, int(i), t) for u in range(60)
            for t, i in enumerate(rng.choice(50, size=8, replace=False))]
    split = make_split(dataset(rows, 50), 0.3, 0, 10)
    m = evaluate(lambda users, _: np.ones((len(users), split.n_items)), split)
    assert m["cold/users"] > 0
    for key in ("full/cold/hr@10", "sampled/cold/hr@10", "new-items/hr@10", "full/hr@10"):
        assert m[key] == 0.0, key


def test_evaluate_val_stage_and_no_users():
    m = evaluate(scorer([]), hand_split(), "val")
    # user 0: val item 2 (0.5) vs 7, 8, 9, 10 (3, 4, 7, 0) -> rank 3; user 1: 0 vs zeros -> 4
    assert m["sampled/mrr"] == pytest.approx((1 / 4 + 1 / 5) / 2)
    empty = evaluate(lambda u, _: np.zeros((len(u), 10)), make_split(
        dataset([(0, 0, 0), (0, 1, 1)], 10), 0.0, 0, 3))
    assert all(math.isnan(empty[key]) for key in KEYS) and empty["users"] == 0


def test_evaluate_rejects_wrong_score_shape():
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda u, _: np.zeros((len(u), 5)), hand_split())


def test_population_subsets_are_nested_and_keep_each_users_split():
    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(40)
            for t, i in enumerate(rng.choice(30, size=6, replace=False))]
    full = make_split(dataset(rows, 30), 0.2, 3, 5)
    small, large = protocol.population(full, 10, 3), protocol.population(full, 20, 3)
    assert (small.n_users, large.n_users) == (10, 20)

    def users_of(s):  # each subset user's (history, val, test, negatives), as a key
        return {(tuple(s.history(u)), int(s.val[u]), int(s.test[u]),
                 tuple(s.test_negatives[u])) for u in range(s.n_users)}

    assert users_of(small) < users_of(large) < users_of(full)  # nested, split unchanged
    assert np.array_equal(small.cold, full.cold) and small.n_items == full.n_items
    assert small.train_ptr[-1] == len(small.train_items)
    assert protocol.population(full, 0, 3) is full
    assert users_of(protocol.population(full, 10, 4)) != users_of(small)  # seeded
    with pytest.raises(FedrecError, match="data.users.*exceeds the 40 users"):
        protocol.population(full, 41, 3)


def test_cold_items_are_unreleased_and_have_no_training_interactions():
    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(30)
            for t, i in enumerate(rng.choice(40, size=8, replace=False))]
    s = make_split(dataset(rows, 40), 0.25, 1, 5)
    assert s.cold.sum() == 10
    assert not s.cold[s.train_items].any()
    assert np.array_equal(s.released, ~s.cold)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 14), st.integers(0, 5)),
                min_size=1, max_size=60),
       st.sampled_from([0.0, 0.2, 0.5]), st.integers(0, 3))
def test_split_invariants(rows, cold_fraction, seed):
    rows = list({(u, i): (u, i, t) for u, i, t in rows}.values())  # readers dedupe pairs
    ds = dataset(rows, 15)
    s = protocol._compute_split(ds, cold_fraction, seed, 5)
    assert not s.cold[s.train_items].any()
    for u in range(ds.n_users):
        mine = ds.items[ds.users == u]
        held = [x for x in (s.val[u], s.test[u]) if x >= 0]
        assert len(held) == (2 if len(mine) >= 3 else 0)
        assert set(s.history(u).tolist()) | set(held) <= set(mine.tolist())
        for negs in (s.val_negatives[u], s.test_negatives[u]):
            assert not set(negs[negs >= 0].tolist()) & set(mine.tolist())


@pytest.mark.parametrize("tie_order", ["random", "item-id"])
def test_a_device_orders_equal_timestamps_as_the_split_does(tmp_path, tie_order):
    """Interactions sharing a timestamp (MovieLens has many) are ordered by the protocol's
    tie rule on the server and on a device alike, whatever order the file lists them in."""
    import json

    from fedrec.data.device import read_catalog, read_history

    rng = np.random.default_rng(4)
    n, seed = 30, 5
    rows = [(u, int(i), int(t)) for u in range(8)
            for i, t in zip(rng.choice(n, 10, replace=False), rng.integers(0, 3, 10))]
    split = make_split(dataset(rows, n), 0.0, seed, 3, tie_order=tie_order)
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"item": str(i), "title": f"t{i}"}) + "\n" for i in range(n)))
    cat = read_catalog(tmp_path)
    for u in range(8):
        mine = [(i, t) for uu, i, t in rows if uu == u]
        rng.shuffle(mine)  # the file's own order is irrelevant
        path = tmp_path / f"h{u}.csv"
        path.write_text("item,timestamp\n" + "".join(f"{i},{t}\n" for i, t in mine))
        seq = read_history(path, cat, seed if tie_order == "random" else None)
        assert seq.tolist() == [*split.history(u).tolist(), split.val[u], split.test[u]]


def test_random_tie_order_is_seeded_and_only_reorders_equal_timestamps():
    assert np.array_equal(protocol.tie_ranks(50, 3), protocol.tie_ranks(50, 3))
    assert sorted(protocol.tie_ranks(50, 3)) == list(range(50))
    assert not np.array_equal(protocol.tie_ranks(50, 3), protocol.tie_ranks(50, 4))
    rng = np.random.default_rng(0)
    tied = [(u, int(i), 0) for u in range(20) for i in rng.choice(40, 6, replace=False)]
    by_id = make_split(dataset(tied, 40), 0.0, 0, 3, tie_order="item-id")
    mixed = make_split(dataset(tied, 40), 0.0, 0, 3, tie_order="random")
    # All at one time: item-id order puts each user's two largest ids last; random does not.
    assert all(by_id.test[u] == max(i for uu, i, _ in tied if uu == u) for u in range(20))
    assert (mixed.test != by_id.test).sum() >= 10
    distinct = [(u, i, t) for u, i, t in ((u, int(i), t) for u in range(20)
                for t, i in enumerate(rng.choice(40, 6, replace=False)))]
    a = make_split(dataset(distinct, 40), 0.0, 0, 3, tie_order="item-id")
    b = make_split(dataset(distinct, 40), 0.0, 0, 3, tie_order="random")
    assert np.array_equal(a.train_items, b.train_items) and np.array_equal(a.test, b.test)
