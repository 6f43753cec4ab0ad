"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest

from fedrec.data.evaluate import auc, hit_rate, mrr, ndcg, rank_of_positive, summarize, user_auc


def ranking_metrics(prefix, pos, cand, k=10):
    return summarize(prefix, rank_of_positive(pos, cand), user_auc(pos, cand), k)


def test_hr_ndcg_mrr_on_hand_ranks():
    ranks = np.array([0, 3, 12])
    assert hit_rate(ranks, 10) == pytest.approx(2 / 3)
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert mrr(ranks) == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    assert hit_rate(ranks, 1) == pytest.approx(1 / 3)
    assert ndcg(ranks, 13) == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)


def test_empty_inputs_are_nan():
    empty = np.zeros(0, np.int64)
    assert all(math.isnan(v) for v in (hit_rate(empty, 10), ndcg(empty, 10), mrr(empty),
                                        auc(np.zeros(0), np.zeros((0, 3)))))


def test_rank_counts_candidates_scoring_at_least_the_positive():
    pos = np.array([0.5, 0.9, 0.1])
    cand = np.array([[0.6, 0.4, 0.5],    # 0.6 above, 0.5 tied -> rank 2
                     [0.1, 0.2, 0.3],    # best -> rank 0
                     [0.2, 0.3, 0.4]])   # worst -> rank 3
    assert rank_of_positive(pos, cand).tolist() == [2, 0, 3]


def test_constant_scorer_gets_pessimistic_rank():
    cand = np.zeros((4, 99))
    ranks = rank_of_positive(np.zeros(4), cand)
    assert ranks.tolist() == [99] * 4
    assert ranking_metrics("s", np.zeros(4), cand)["s/hr@10"] == 0.0
    assert auc(np.zeros(4), cand) == pytest.approx(0.5)  # AUC: ties count half


def test_minus_inf_candidates_are_excluded():
    pos = np.array([0.0, -np.inf])
    cand = np.array([[-np.inf, -np.inf, 1.0, -1.0],
                     [-np.inf, 2.0, -np.inf, -np.inf]])
    assert rank_of_positive(pos, cand).tolist() == [1, 1]
    assert auc(pos[:1], cand[:1]) == pytest.approx(0.5)  # one above, one below
    assert auc(pos[1:], cand[1:]) == 0.0  # the -inf padding is not "tied" with -inf


def test_nan_never_helps_the_model():
    assert rank_of_positive(np.array([np.nan]), np.array([[0.0, 1.0, -np.inf]])).tolist() == [2]
    assert rank_of_positive(np.array([1.0]), np.array([[np.nan, 0.0]])).tolist() == [1]
    assert auc(np.array([np.nan]), np.array([[0.0, 1.0]])) == 0.0


def test_auc_hand_value():
    pos = np.array([0.5, 0.5])
    cand = np.array([[0.1, 0.9, 0.5, 0.2], [1.0, 2.0, 3.0, 4.0]])
    # user 0: 2 below + 0.5 tie of 4 = 0.625; user 1: 0 of 4
    assert auc(pos, cand) == pytest.approx((0.625 + 0.0) / 2)


def test_ranking_metrics_keys_and_values():
    pos = np.array([1.0, 0.0])
    cand = np.array([[0.0, 2.0], [1.0, 2.0]])  # ranks 1 and 2
    m = ranking_metrics("sampled", pos, cand, k=2)
    assert set(m) == {"sampled/hr@2", "sampled/ndcg@2", "sampled/mrr", "sampled/auc"}
    assert m["sampled/hr@2"] == 0.5
    assert m["sampled/ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["sampled/mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["sampled/auc"] == pytest.approx(0.25)
