"""The ranking rules, one implementation for the predictor and the estimator (numpy only).

- Item index 0 (PAD) never ranks; `drop` lists more indices that must not (explicit exclusions, and with
  exclude_seen every known item of the session, also those older than the model's window); `allow`, when given,
  is the only items that may (an allow-list such as the items in stock).
- A session with no known item gets the popular items: score log(1 + training count); items with no count are
  not listed (`popular_scores`).
- Only finite scores rank: a NaN or infinite score is never recommended (`finite`).
- Ties keep the lower item index; k beyond what is left returns what is left.
- `temperature > 0` samples k distinct items from softmax(score / temperature) (Gumbel top-k) instead of taking
  the top k; the scores returned stay the model's, in the sampled order.
- `normalize` turns the scores into softmax probabilities over the items still allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sasrec_serve.ids import PAD


@dataclass(frozen=True)
class Recommendation:
    """Ranked items with their scores; iterating gives `(item_id, score)` pairs, best first.

    `fallback` is True when the session had no known item and the popular items were returned; `unknown` lists
    the session's ids that are not in the catalogue (skipped), in the order given."""

    items: tuple
    scores: tuple
    fallback: bool
    unknown: tuple

    def __iter__(self):
        return iter(zip(self.items, self.scores))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        return self.items[i], self.scores[i]

    def to_dict(self) -> dict:
        return {"items": list(self.items), "scores": list(self.scores), "fallback": self.fallback,
                "unknown": list(self.unknown)}  # fmt: skip


def popular_scores(num_items: int, counts: Iterable[tuple[int, float]]) -> np.ndarray:
    """The fallback ranking [V + 1]: log(1 + count) for (item index, count) pairs with a count > 0, else -inf."""
    s_V1 = np.full(num_items + 1, -np.inf)
    for idx, count in counts:
        if count > 0:
            s_V1[idx] = np.log1p(float(count))
    return s_V1


def finite(scores_V1: np.ndarray) -> np.ndarray | None:
    """One session's scores as float64 with NaN and ±inf made -inf (never ranked); None when no real item has a
    finite score (the model is broken: callers raise their own error)."""
    s_V1 = np.asarray(scores_V1, dtype=np.float64).copy()
    ok = np.isfinite(s_V1)
    if not ok[1:].any():
        return None
    s_V1[~ok] = -np.inf
    return s_V1


def top(s_V1: np.ndarray, k: int, temperature: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of the k best finite entries (or k sampled by Gumbel top-k), best first; fewer if fewer exist."""
    if temperature > 0:
        rng = rng if rng is not None else np.random.default_rng()
        allowed = np.flatnonzero(np.isfinite(s_V1))  # sampled among these only, even where s / T overflows
        with np.errstate(over="ignore"):
            keys = s_V1[allowed] / temperature + rng.gumbel(size=len(allowed))
        big = np.finfo(np.float64).max
        return allowed[top(np.clip(keys, -big, big), k)]
    k = min(k, int(np.isfinite(s_V1).sum()))
    if k == 0:
        return np.zeros(0, np.int64)
    if k < len(s_V1):  # every entry at least as good as the k-th, so that ties at the boundary are all seen
        kth = s_V1[np.argpartition(-s_V1, k - 1)[k - 1]]
        best = np.flatnonzero(s_V1 >= kth)
    else:
        best = np.arange(len(s_V1))
    return best[np.lexsort((best, -s_V1[best]))][:k]  # best score first, ties to the lower index


def rank(
    s_V1: np.ndarray,
    k: int,
    drop: Iterable[int] = (),
    *,
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
    normalize: bool = False,
    allow: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(item indices, their scores) of one session's top k under the rules above; `s_V1` is not modified."""
    if allow is not None:
        allowed_V1 = np.full(len(s_V1), -np.inf)
        allowed_V1[allow] = s_V1[allow]
        s_V1 = allowed_V1
    else:
        s_V1 = s_V1.copy()
    s_V1[PAD] = -np.inf
    s_V1[np.fromiter(drop, dtype=np.int64)] = -np.inf
    order = top(s_V1, k, temperature, rng)
    picked = s_V1[order]
    if normalize and len(order):
        picked = np.exp(picked - np.logaddexp.reduce(s_V1[np.isfinite(s_V1)]))
    return order, picked
