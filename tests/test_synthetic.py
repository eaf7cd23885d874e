"""Tests for the synthetic session generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sasrec_jax.errors import ConfigError
from sasrec_jax.synthetic import SyntheticConfig, SyntheticData, generate_sessions

SMALL = SyntheticConfig(n_users=3_000, n_items=1_000, n_categories=10, seed=7)


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate_sessions(SMALL)


@pytest.fixture(scope="module")
def joined(data: SyntheticData) -> pd.DataFrame:
    return data.events.merge(data.item_category, on="item_id").merge(data.user_type, on="user_id")


def test_deterministic_and_seed_sensitive(data: SyntheticData) -> None:
    again = generate_sessions(SMALL)
    pd.testing.assert_frame_equal(data.events, again.events)
    pd.testing.assert_frame_equal(data.item_category, again.item_category)
    pd.testing.assert_frame_equal(data.user_type, again.user_type)
    other = generate_sessions(SMALL, seed=8)
    assert not data.events["item_id"].equals(other.events["item_id"])


def test_shapes_and_dtypes(data: SyntheticData) -> None:
    events = data.events
    assert list(events.columns) == ["user_id", "item_id", "timestamp"]
    assert all(events[c].dtype == np.int64 for c in events.columns)
    assert list(data.item_category.columns) == ["item_id", "category", "popularity_rank"]
    assert data.item_category["item_id"].tolist() == list(range(1, SMALL.n_items + 1))
    assert set(data.item_category["category"]) == set(range(SMALL.n_categories))
    assert list(data.user_type.columns) == ["user_id", "type"]
    assert data.user_type["user_id"].tolist() == list(range(1, SMALL.n_users + 1))
    shares = data.user_type["type"].value_counts(normalize=True)
    assert set(shares.index) == {"deep_dive", "explorer", "comparer"}
    assert shares.min() > 0.28


def test_lengths_ids_and_time_order(data: SyntheticData) -> None:
    events = data.events
    assert events["item_id"].between(1, SMALL.n_items).all()
    lengths = events.groupby("user_id", sort=False).size()
    assert len(lengths) == SMALL.n_users
    assert lengths.between(SMALL.min_len, SMALL.max_len).all()
    assert events["user_id"].is_monotonic_increasing
    same_user = events["user_id"].to_numpy()[1:] == events["user_id"].to_numpy()[:-1]
    assert (np.diff(events["timestamp"].to_numpy())[same_user] > 0).all()
    repeats = (np.diff(events["item_id"].to_numpy()) == 0) & same_user
    assert repeats.mean() < 0.001


def _stay_fraction(joined: pd.DataFrame) -> pd.Series:
    """Fraction of consecutive steps (same user) that stay in the same category, per user type."""
    same_user = joined["user_id"].to_numpy()[1:] == joined["user_id"].to_numpy()[:-1]
    same_cat = joined["category"].to_numpy()[1:] == joined["category"].to_numpy()[:-1]
    steps = pd.DataFrame({"type": joined["type"].to_numpy()[1:], "stay": same_cat})[same_user]
    return steps.groupby("type")["stay"].mean()


def test_user_types_behave_differently(joined: pd.DataFrame) -> None:
    stay = _stay_fraction(joined)
    assert stay["deep_dive"] > 0.75
    assert stay["explorer"] < 0.7
    assert stay["deep_dive"] - stay["explorer"] > 0.15
    per_user = joined.groupby("user_id").agg(type=("type", "first"), n_cat=("category", "nunique"))
    assert per_user.loc[per_user["type"] == "comparer", "n_cat"].max() <= 3
    assert per_user.loc[per_user["type"] == "explorer", "n_cat"].mean() > 3


def test_neighbour_signal(joined: pd.DataFrame) -> None:
    """Within-category steps often move to a nearby popularity rank (the learnable sequential signal)."""
    same_user = joined["user_id"].to_numpy()[1:] == joined["user_id"].to_numpy()[:-1]
    same_cat = joined["category"].to_numpy()[1:] == joined["category"].to_numpy()[:-1]
    gap = np.abs(np.diff(joined["popularity_rank"].to_numpy()))
    near = (gap <= 3)[same_user & same_cat]
    assert near.mean() > 0.4


def test_popularity_is_skewed(data: SyntheticData) -> None:
    counts = data.events["item_id"].value_counts()
    top = counts.iloc[: SMALL.n_items // 10].sum()
    assert top / counts.sum() > 0.4


def test_no_skew_with_zipf_zero() -> None:
    counts = generate_sessions(SMALL, zipf_a=0.0, near_prob=0.0).events["item_id"].value_counts()
    assert counts.iloc[: SMALL.n_items // 10].sum() / counts.sum() < 0.2


def test_tiny_configs_work() -> None:
    one = generate_sessions(n_users=5, n_items=1, n_categories=1, min_len=1, max_len=3)
    assert set(one.events["item_id"]) == {1}
    two = generate_sessions(n_users=50, n_items=2, n_categories=2, min_len=4, max_len=4)
    assert len(two.events) == 200


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_items": 10, "n_categories": 20}, "n_items"),
        ({"min_len": 0}, "min_len"),
        ({"min_len": 10, "max_len": 5}, "min_len"),
        ({"n_users": 0}, "n_users"),
        ({"stay_deep": 1.5}, "stay_deep"),
        ({"near_prob": -0.1}, "near_prob"),
        ({"zipf_a": float("nan")}, "zipf_a"),
        ({"n_items": 10.5}, "n_items"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SyntheticConfig(**overrides)
    with pytest.raises(ConfigError, match=match):
        generate_sessions(**overrides)


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match="n_user"):
        generate_sessions(n_user=10)
