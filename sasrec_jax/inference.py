"""Inference on fitted weights: windows of raw item ids, the one jitted scorer, and recommendations ranked by the
serving package's rules (`sasrec_serve.ranking`), so the estimator and an exported bundle rank alike."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import numpy as np
from sasrec_serve import ids, ranking
from sasrec_serve.ids import PAD, ItemVocab
from sasrec_serve.ranking import Recommendation

from sasrec_jax.model import merge


def make_scorer(graphdef, placement):
    """The jitted scorer: `make_scorer(graphdef, placement)(params)(seq_BxL)` gives scores [B, V + 1] as a global
    array split over the placement's mesh (B a multiple of its device count; each process passes its rows).
    Training's validation, evaluation, the estimator and export's reference scores all run this function."""

    @jax.jit
    def scores(params, seq_BxL):
        return merge(graphdef, params)(seq_BxL)

    def score_fn(params):
        return lambda seq: scores(params, placement.shard_batch(np.asarray(seq, np.int32)))

    return score_fn


class Scorer:
    """The jitted scorer on host arrays of any batch size (one process): rows are padded to a power of two
    (a multiple of the device count), so a service-like stream of batch sizes compiles only a few shapes."""

    def __init__(self, graphdef, params, placement):
        self.placement = placement
        self.params = placement.replicate(params)
        self.sharded = make_scorer(graphdef, placement)(self.params)  # for evaluate.rank's global batches

    def __call__(self, seq_NxL: np.ndarray) -> np.ndarray:
        n = len(seq_NxL)
        bucket = self.placement.round_batch(1 << max(0, (n - 1).bit_length()))
        padded_BxL = np.zeros((bucket, seq_NxL.shape[1]), np.int32)
        padded_BxL[:n] = seq_NxL
        return np.asarray(self.sharded(padded_BxL))[:n]


def windows(vocab: ItemVocab, sessions: Sequence[Iterable], max_len: int) -> tuple[np.ndarray, list, list]:
    """`sasrec_serve.ids.windows` of sessions of raw ids: left-padded [N, max_len] windows, every known index of
    each session, and each session's unknown ids. A bare id (a string or a number) is a session of one item."""

    def split(r: int, items) -> tuple[list[int], list]:
        items = [items] if isinstance(items, (str, bytes)) or not isinstance(items, Iterable) else list(items)
        return vocab.split(items)

    return ids.windows(sessions, max_len, split)


def recommend(
    scorer,
    vocab: ItemVocab,
    sessions: Sequence[Iterable],
    k: int,
    max_len: int,
    *,
    popular_V1: np.ndarray,
    exclude_seen: bool = True,
    exclude: Iterable = (),
    allow: np.ndarray | None = None,
) -> list[Recommendation]:
    """Top-k for each session of raw ids under `sasrec_serve.ranking`'s rules: unknown ids skipped and reported,
    the popular items (log(1 + count)) for a session with no known item, NaN/inf never recommended, only the item
    indices in `allow` when it is given."""
    seq_NxL, known, unknown = windows(vocab, sessions, max_len)
    dropped = vocab.split(list(exclude))[0]
    live = np.flatnonzero((seq_NxL != PAD).any(axis=1))
    scores_NxV1 = scorer(seq_NxL[live]) if len(live) else None
    row_of = {int(r): j for j, r in enumerate(live)}
    out = []
    for r in range(len(seq_NxL)):
        fallback = r not in row_of
        s_V1: np.ndarray | None
        if fallback:
            s_V1 = popular_V1
        elif scores_NxV1 is not None:  # every live session was scored above
            s_V1 = ranking.finite(scores_NxV1[row_of[r]])
        else:
            raise RuntimeError(f"session {r} has no scores")  # cannot happen
        if s_V1 is None:  # no finite score: broken weights (never checkpointed, so only a hand-made model)
            raise FloatingPointError(f"the model gave no finite score for session {r}")
        order, picked = ranking.rank(s_V1, k, [*dropped, *(known[r] if exclude_seen else ())], allow=allow)
        out.append(Recommendation(tuple(vocab.decode(order)), tuple(picked.tolist()), fallback, tuple(unknown[r])))
    return out


def rows_per_block(num_items: int) -> int:
    """Sessions scored at once by the batch methods: [rows, V + 1] float32 scores stay near 64 MB whatever the
    catalogue (a power of two, the scorer's batch sizes)."""
    return 1 << max(0, min(12, (2**24 // (num_items + 1)).bit_length() - 1))


def blocks(n: int, block: int, desc: str, progress: bool) -> Iterable[int]:
    """The starts of the blocks of n rows, with a bar when there is more than one."""
    from tqdm.auto import tqdm

    return tqdm(range(0, n, block), desc=desc, disable=not progress or n <= block, leave=False)


def similar_items(
    table_V1xD: np.ndarray, targets: list[int], k: int, filter_itself: bool, allow: np.ndarray | None, progress: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each target item index, (item indices, cosine similarities) of its k nearest items by embedding, under
    `sasrec_serve.ranking`'s rules (`filter_itself` drops the target; `allow` limits the candidates)."""
    unit_V1xD = table_V1xD / np.maximum(np.linalg.norm(table_V1xD, axis=1, keepdims=True), 1e-12)
    out, block = [], rows_per_block(len(table_V1xD) - 1)
    for lo in blocks(len(targets), block, "recommend_to_items", progress):
        part = targets[lo : lo + block]
        for i, s_V1 in zip(part, unit_V1xD[part] @ unit_V1xD.T):
            out.append(ranking.rank(s_V1.astype(np.float64), k, [i] if filter_itself else (), allow=allow))
    return out
