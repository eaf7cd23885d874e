"""Seeded synthetic browsing sessions: the built-in default data set, so everything runs offline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sasrec_jax.errors import ConfigError

USER_TYPES = ("deep_dive", "explorer", "comparer")
_DEEP, _EXPLORER, _COMPARER = range(3)
# A comparer flips to another of its preferred categories this often (it "alternates" between them).
_COMPARER_SWITCH = 0.5
# Neighbours are items whose popularity rank (within the category) differs by 1..3.
_NEIGHBOUR_SPAN = 3
# Sessions start within 90 days of this epoch (2020-09-13); gaps average ~5 minutes.
_EPOCH = 1_600_000_000
_START_SPREAD_S = 90 * 86_400
_MEAN_GAP_S = 300.0


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and behaviour of the synthetic data set; validated on construction."""

    n_users: int = 20_000
    n_items: int = 5_000
    n_categories: int = 25
    min_len: int = 5
    max_len: int = 35
    zipf_a: float = 1.1
    stay_deep: float = 0.85
    switch_explore: float = 0.40
    near_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_categories", "min_len", "max_len", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"SyntheticConfig.{name} must be an integer, got {value!r}")
        for name in ("n_users", "n_items", "n_categories", "min_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"SyntheticConfig.seed must be >= 0, got {self.seed}")
        if self.n_items < self.n_categories:
            raise ConfigError(f"SyntheticConfig.n_items ({self.n_items}) must be >= n_categories ({self.n_categories})")
        if self.min_len > self.max_len:
            raise ConfigError(f"SyntheticConfig.min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        if not (np.isfinite(self.zipf_a) and self.zipf_a >= 0):
            raise ConfigError(f"SyntheticConfig.zipf_a must be a finite number >= 0, got {self.zipf_a}")
        for name in ("stay_deep", "switch_explore", "near_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"SyntheticConfig.{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class SyntheticData:
    """Generated events plus the ground truth behind them (item categories, user types)."""

    events: pd.DataFrame
    item_category: pd.DataFrame
    user_type: pd.DataFrame


@dataclass(frozen=True)
class _Catalogue:
    """Items in internal order: sorted by category, then by popularity rank within it."""

    starts: np.ndarray  # first internal index of each category
    sizes: np.ndarray  # number of items in each category
    item_cat: np.ndarray  # category of each internal item
    item_rank: np.ndarray  # 0-based popularity rank of each internal item within its category
    cdf: np.ndarray  # category + within-category Zipf CDF, increasing over all items

    def zipf(self, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Inverse-CDF draw of one item per row from category `cat`, using uniforms `u`."""
        # Category c's CDF lives in (c, c + 1], so one searchsorted serves all categories at once.
        idx = np.searchsorted(self.cdf, cat + u, side="right")
        return np.clip(idx, self.starts[cat], self.starts[cat] + self.sizes[cat] - 1)

    def at_rank(self, cat: np.ndarray, rank: np.ndarray) -> np.ndarray:
        return self.starts[cat] + rank


def _catalogue(n_items: int, n_categories: int, zipf_a: float) -> _Catalogue:
    sizes = np.full(n_categories, n_items // n_categories, dtype=np.int64)
    sizes[: n_items % n_categories] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    item_cat = np.repeat(np.arange(n_categories), sizes)
    item_rank = np.arange(n_items) - starts[item_cat]
    weights = (item_rank + 1.0) ** -zipf_a
    running = np.cumsum(weights)
    before = np.repeat(running[starts] - weights[starts], sizes)
    totals = np.repeat(np.add.reduceat(weights, starts), sizes)
    within = (running - before) / totals
    # Force each category's CDF to end at exactly 1 so rounding can never leak into the next category.
    within[starts + sizes - 1] = 1.0
    return _Catalogue(starts, sizes, item_cat, item_rank, item_cat + within)


def _neighbour(cat_info: _Catalogue, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An item of similar popularity rank (+-1..3) in the same category as `prev`."""
    cat = cat_info.item_cat[prev]
    size = cat_info.sizes[cat]
    rank = cat_info.item_rank[prev]
    offset = rng.integers(1, _NEIGHBOUR_SPAN + 1, prev.size) * rng.choice([-1, 1], prev.size)
    moved = rank + offset
    # Reflect at the ends of the category rather than clipping, which would pile up on the extremes.
    moved = np.where((moved < 0) | (moved >= size), rank - offset, moved)
    return cat_info.at_rank(cat, np.clip(moved, 0, size - 1))


def _avoid_repeats(
    cat_info: _Catalogue, item: np.ndarray, prev: np.ndarray, cat: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Replace immediate repeats: one Zipf redraw, then step to the next rank if still equal."""
    same = item == prev
    item[same] = cat_info.zipf(cat[same], rng.random(int(same.sum())))
    same = item == prev
    size = cat_info.sizes[cat[same]]
    item[same] = cat_info.at_rank(cat[same], (cat_info.item_rank[item[same]] + 1) % size)
    return item


def _comparer_prefs(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each user's 2-3 distinct preferred categories (fewer only if there are fewer categories)."""
    k = min(3, cfg.n_categories)
    prefs = np.argsort(rng.random((cfg.n_users, cfg.n_categories)), axis=1)[:, :k]
    n_pref = rng.integers(min(2, k), k + 1, cfg.n_users)
    return prefs, n_pref


def _simulate(cfg: SyntheticConfig, cat_info: _Catalogue, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Walk all users forward one step at a time; returns (types, internal item matrix)."""
    n, n_cat = cfg.n_users, cfg.n_categories
    rows = np.arange(n)
    types = rng.integers(0, 3, n)
    comparer = types == _COMPARER
    prefs, n_pref = _comparer_prefs(cfg, rng)
    pos = np.zeros(n, dtype=np.int64)
    cat = np.where(comparer, prefs[:, 0], rng.integers(0, n_cat, n))
    switch_prob = np.array([1.0 - cfg.stay_deep, cfg.switch_explore, _COMPARER_SWITCH])[types]

    items = np.empty((n, cfg.max_len), dtype=np.int64)
    items[:, 0] = prev = cat_info.zipf(cat, rng.random(n))
    for t in range(1, cfg.max_len):
        switch = (rng.random(n) < switch_prob) & (n_cat > 1)
        # Shifting by 1..n-1 guarantees a *different* category (or preferred slot) on a switch.
        other_cat = (cat + rng.integers(1, max(n_cat, 2), n)) % n_cat
        other_pos = (pos + rng.integers(1, np.maximum(n_pref, 2))) % n_pref
        new_cat = np.where(comparer, prefs[rows, other_pos], other_cat)
        cat = np.where(switch, new_cat, cat)
        pos = np.where(switch & comparer, other_pos, pos)

        near = ~switch & (rng.random(n) < cfg.near_prob)
        item = np.where(near, _neighbour(cat_info, prev, rng), cat_info.zipf(cat, rng.random(n)))
        items[:, t] = prev = _avoid_repeats(cat_info, item, prev, cat, rng)
    return types, items


def generate_sessions(config: SyntheticConfig | None = None, **overrides: Any) -> SyntheticData:
    """Generate the synthetic data set; `overrides` replace fields of `config` (default config if None)."""
    cfg = config if config is not None else SyntheticConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SyntheticConfig)})
        if unknown:
            raise ConfigError(f"unknown SyntheticConfig field(s): {', '.join(unknown)}")
        cfg = dataclasses.replace(cfg, **overrides)

    rng = np.random.default_rng(cfg.seed)
    cat_info = _catalogue(cfg.n_items, cfg.n_categories, cfg.zipf_a)
    # A seeded permutation decouples external ids from category and popularity.
    external_id = rng.permutation(cfg.n_items).astype(np.int64) + 1
    types, items = _simulate(cfg, cat_info, rng)

    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, cfg.n_users)
    gaps = 1 + np.floor(rng.exponential(_MEAN_GAP_S, (cfg.n_users, cfg.max_len))).astype(np.int64)
    start = _EPOCH + rng.integers(0, _START_SPREAD_S, cfg.n_users)
    timestamps = start[:, None] + np.cumsum(gaps, axis=1)

    # Row-major masking keeps rows grouped by user and in time order within each user.
    keep = np.arange(cfg.max_len)[None, :] < lengths[:, None]
    user_ids = np.arange(1, cfg.n_users + 1, dtype=np.int64)
    events = pd.DataFrame(
        {
            "user_id": np.repeat(user_ids, lengths),
            "item_id": external_id[items[keep]],
            "timestamp": timestamps[keep].astype(np.int64),
        }
    )
    order = np.argsort(external_id)
    item_category = pd.DataFrame(
        {
            "item_id": external_id[order],
            "category": cat_info.item_cat[order].astype(np.int64),
            "popularity_rank": cat_info.item_rank[order].astype(np.int64) + 1,
        }
    )
    user_type = pd.DataFrame({"user_id": user_ids, "type": np.array(USER_TYPES)[types]})
    return SyntheticData(events=events, item_category=item_category, user_type=user_type)
