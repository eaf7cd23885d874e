"""The seed use cases on top of a Predictor: viewed-items widget, re-engagement, cart recovery, session focus."""

from __future__ import annotations

import math

from sasrec_serve.bundle import ITEM_EMBEDDINGS, BundleError
from sasrec_serve.predictor import Predictor, Recommendation, unit_rows


def because_you_viewed(predictor: Predictor, viewed, k: int = 10, exclude=()) -> Recommendation:
    """The "based on what you viewed" widget: the next items for an anonymous visitor's session of raw ids
    (oldest first), without the items already viewed. An empty or all-unknown session gets the popular items.

    Example: `for item, score in because_you_viewed(predictor, ["sku3", "sku4"], k=4): ...`
    """
    return predictor.recommend(viewed, k=k, exclude_seen=True, exclude=exclude)


def reengage(predictor: Predictor, history, last_n: int | None = None, exclude=()) -> Recommendation:
    """Re-engagement (an e-mail or push for a returning user): the single best item from the last `last_n`
    items of a known history (default: all of it, of which the model reads its window of L), never an item
    anywhere in the history.

    Example: `reengage(predictor, user_history, last_n=20).items` is a tuple of at most one id.
    """
    history = list(history)
    recent = history[-last_n:] if last_n else history
    return predictor.recommend(recent, k=1, exclude_seen=True, exclude=list(exclude) + history)


def recover_cart(predictor: Predictor, cart, k: int = 5, exclude=()) -> Recommendation:
    """Cart-abandonment recovery: items to suggest beside an abandoned cart, each with its normalised interest,
    the model's softmax probability that it comes next among all items not in the cart (so the k scores sum
    to at most 1 and compare across carts; for a fallback, the same over the popular items).

    Example: `[(item, round(p, 3)) for item, p in recover_cart(predictor, ["sku7", "sku8"], k=3)]`
    """
    return predictor.recommend(cart, k=k, exclude_seen=True, exclude=exclude, normalize=True)


def session_focus(predictor: Predictor, items) -> float | None:
    """How focused a session is: the mean cosine similarity over all pairs of its distinct known items'
    embeddings, clipped to [0, 1] (0: no more alike than unrelated items, or less; 1: all the same direction).
    A deep dive into one category scores higher than a scattered session. Unknown ids are skipped; with
    fewer than 2 distinct known items the focus is undefined and None is returned. Never NaN: a non-finite
    result (broken embeddings) raises BundleError.

    Example: `session_focus(predictor, ["sku3", "sku4", "sku5"])` is a float in [0, 1].
    """
    idx, _ = predictor.lookup(items)
    distinct = sorted(set(idx))
    n = len(distinct)
    if n < 2:
        return None
    sum_D = unit_rows(predictor.item_embeddings[distinct]).sum(axis=0)
    # sum over ordered pairs i != j of u_i·u_j = |Σu|² − Σ|u_i|² = |Σu|² − n: O(n·D) rather than an n×n matrix
    mean = float((sum_D @ sum_D - n) / (n * (n - 1)))
    if not math.isfinite(mean):  # the clip below would turn NaN into a plausible 0.0
        raise BundleError(f"{ITEM_EMBEDDINGS} gives a non-finite focus for this session")
    return min(1.0, max(0.0, mean))
