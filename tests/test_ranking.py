"""The ranking rules of sasrec_serve.ranking (one implementation for the predictor and the estimator), checked
against a plain sort on small score vectors."""

from __future__ import annotations

import numpy as np
from sasrec_serve import ranking


def by_the_rules(s_V1: np.ndarray, k: int, drop=()) -> list[int]:
    """The documented order: finite scores only, PAD (0) and `drop` never, best first, ties to the lower index."""
    allowed = [i for i in range(1, len(s_V1)) if np.isfinite(s_V1[i]) and i not in set(drop)]
    return sorted(allowed, key=lambda i: (-s_V1[i], i))[:k]


def test_ties_keep_the_lower_item_index():
    s_V1 = np.array([-np.inf, 0.5, 2.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert list(ranking.rank(s_V1, 3)[0]) == [2, 4, 5]
    assert list(ranking.rank(s_V1, 2)[0]) == [2, 4]


def test_rank_is_the_top_k_by_the_rules():
    rng = np.random.default_rng(0)
    for k in [1, 3, 10, 40] * 20:
        s_V1 = rng.integers(0, 4, size=31).astype(np.float64)  # few distinct values: many ties
        s_V1[rng.integers(0, 31, size=3)] = rng.choice([np.nan, np.inf, -np.inf], size=3)
        drop = rng.integers(0, 31, size=4).tolist()
        finite = ranking.finite(s_V1)  # what the predictor and the estimator rank: NaN and ±inf made -inf
        order, scores = ranking.rank(finite, k, drop)
        assert list(order) == by_the_rules(finite, k, drop)
        np.testing.assert_array_equal(scores, s_V1[order])
