"""Ranking metrics in plain numpy, from 0-based ranks of each held-out target (rank 0 = top)."""

from __future__ import annotations

import numpy as np

CUTOFFS = (1, 5, 10, 20)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(np.asarray(ranks) < k)) if len(ranks) else 0.0


def ndcg(ranks: np.ndarray, k: int) -> float:
    """With a single relevant item, NDCG@k = 1 / log2(rank + 2) when it is in the top k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))) if len(ranks) else 0.0


def mrr(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0))) if len(ranks) else 0.0


def coverage(top_ids: np.ndarray, num_items: int) -> float:
    """Share of the catalogue that appears in at least one recommendation list."""
    return float(len(np.unique(top_ids)) / num_items) if num_items else 0.0


def summarize(ranks: np.ndarray, cutoffs=CUTOFFS) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in cutoffs:
        out[f"HR@{k}"] = hit_rate(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
        out[f"MRR@{k}"] = mrr(ranks, k)
    return out
