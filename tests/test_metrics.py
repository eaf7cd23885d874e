"""Metrics against hand-computed values; ranking protocol details (ties, history exclusion); baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sasrec_jax import data, evaluate, metrics


def test_hand_computed_metrics():
    ranks = np.array([0, 2, 15])  # hit at 1, hit at 3, miss at 10
    assert metrics.ndcg([0], 10) == 1.0
    assert metrics.ndcg([2], 10) == pytest.approx(0.5)
    assert metrics.hit_rate(ranks, 10) == pytest.approx(2 / 3)
    assert metrics.ndcg(ranks, 10) == pytest.approx((1 + 0.5) / 3)
    assert metrics.mrr(ranks, 10) == pytest.approx((1 + 1 / 3) / 3)
    assert metrics.hit_rate(ranks, 1) == pytest.approx(1 / 3)
    assert metrics.ndcg(ranks, 20) == pytest.approx((1 + 0.5 + 1 / math.log2(17)) / 3)
    assert metrics.coverage(np.array([[1, 2], [2, 3]]), 10) == pytest.approx(0.3)


def windows(history: list[list[int]], targets: list[int]) -> data.SequenceSet:
    items = np.array([i for h in history for i in h], np.int32)
    ends = np.cumsum([len(h) for h in history])
    return data.SequenceSet(
        items, ends - np.array([len(h) for h in history]), ends, np.arange(len(history)), np.array(targets, np.int32)
    )


def test_rank_excludes_history_but_keeps_target():
    # 5 items; scores descending with the item index
    score = lambda seq: np.tile(np.arange(6, dtype=np.float32), (len(seq), 1))
    w = windows([[5, 4], [1]], [3, 5])
    r = evaluate.rank(score, w, 5, 4, batch_size=4)
    assert r.ranks.tolist() == [0, 0]  # items 5 and 4 are history: target 3 is first
    r = evaluate.rank(score, w, 5, 4, exclude_seen=False, batch_size=4)
    assert r.ranks.tolist() == [2, 0]
    assert r.top.shape == (2, 5)  # top-k capped by the catalogue (V + 1 = 6 columns, padding excluded)


def test_ties_count_against_the_target():
    flat = lambda seq: np.zeros((len(seq), 11), np.float32)
    r = evaluate.rank(flat, windows([[1]], [2]), 10, 3, batch_size=2)
    assert r.ranks.tolist() == [8]  # 10 items, 1 seen: the target ranks last of the 9 remaining


def test_sampled_protocol_negatives_are_unseen():
    w = windows([[1, 2, 3], [4]], [5, 6])
    negs = evaluate.sample_unseen(w, 200, num=100, seed=0)
    assert negs.shape == (2, 100)
    assert not set(negs[0]) & {1, 2, 3, 5} and not set(negs[1]) & {4, 6}
    score = lambda seq: np.tile(np.arange(201, dtype=np.float32), (len(seq), 1))
    r = evaluate.rank(score, w, 200, 4, protocol="sampled", batch_size=2)
    assert r.ranks.tolist() == [int((negs[0] >= 5).sum()), int((negs[1] >= 6).sum())]


def test_markov_and_popular_baselines():
    s = data.from_interactions(
        __import__("pandas").DataFrame({"user_id": [1, 1, 1, 2, 2, 3, 3], "item_id": [1, 2, 3, 1, 2, 3, 1]}),
        time_col=None,
    )
    train = s.as_set()
    markov = evaluate.markov_scorer(train, s.vocab.size)
    seq = np.array([[0, 1], [0, 3]], np.int32)
    scores = markov(seq)
    assert scores[0].argmax() == 2  # after 1 comes 2 (twice)
    assert scores[1].argmax() == 1  # after 3 comes 1 (once)
    pop = evaluate.popular_scorer(train, s.vocab.size)(seq)
    assert pop[0, 1] == 3 and pop[0, 2] == 2
