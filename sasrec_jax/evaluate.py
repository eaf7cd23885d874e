"""Batched, jitted ranking of held-out targets for the model and the baselines, under one protocol.

Protocols:
  full     — the target is ranked against every item of the catalogue; with `exclude_seen` the items of the
             input history are removed from the ranking (the target itself always stays in it).
  sampled  — the paper's protocol: the target against 100 items drawn uniformly from those the user has
             not interacted with (seeded).
Ties count against the target (pessimistic): an all-equal scorer gets the worst rank, not the best.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import NamedSharding, PartitionSpec
from sasrec_serve.ids import PAD

from sasrec_jax import distributed, logs, metrics
from sasrec_jax.data import SequenceSet
from sasrec_jax.errors import ConfigError

PROTOCOLS = ("full", "sampled")
SAMPLED_NEGATIVES = 100
COVERAGE_K = 10

ScoreFn = Callable[[np.ndarray], "jax.Array | np.ndarray"]  # seq_BxL -> scores_BxV


@jax.jit
def _rank_full(scores_BxV: jax.Array, seq_BxL: jax.Array, t_B: jax.Array, exclude_seen: jax.Array):
    """(0-based pessimistic rank of each target, top-COVERAGE_K item indices)."""
    scores_BxV = scores_BxV.astype(jnp.float32)
    B, V = scores_BxV.shape
    rows_B1 = jnp.arange(B)[:, None]
    t_score_B = scores_BxV[jnp.arange(B), t_B]
    seen_BxV = jnp.zeros((B, V), bool).at[rows_B1, seq_BxL].set(True) & exclude_seen
    masked_BxV = jnp.where(seen_BxV | (jnp.arange(V) == PAD)[None], -jnp.inf, scores_BxV)
    top_BxK = jax.lax.top_k(masked_BxV, min(COVERAGE_K, V - 1))[1]
    others_BxV = masked_BxV.at[jnp.arange(B), t_B].set(-jnp.inf)
    rank_B = jnp.sum(others_BxV >= t_score_B[:, None], axis=-1)
    return rank_B, top_BxK


@jax.jit
def _nll(scores_BxV: jax.Array, t_B: jax.Array) -> jax.Array:
    """-log softmax(scores)[target] per row, in float32: the full-softmax cross-entropy the `ce` training loss takes
    (padding's column is NEG_INF in the scores, so it gets no probability, as in training; nothing else is left
    out: the user's own history stays in the softmax, as it does in the training loss)."""
    scores_BxV = scores_BxV.astype(jnp.float32)
    t_score_B = jnp.take_along_axis(scores_BxV, t_B[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(scores_BxV, axis=-1) - t_score_B


@jax.jit
def _rank_sampled(scores_BxV: jax.Array, t_B: jax.Array, negs_BxM: jax.Array):
    scores_BxV = scores_BxV.astype(jnp.float32)
    t_score_B = jnp.take_along_axis(scores_BxV, t_B[:, None], axis=-1)[:, 0]
    neg_BxM = jnp.take_along_axis(scores_BxV, negs_BxM, axis=-1)
    return jnp.sum(neg_BxM >= t_score_B[:, None], axis=-1)


def sample_unseen(windows: SequenceSet, num_items: int, num: int = SAMPLED_NEGATIVES, seed: int = 0) -> np.ndarray:
    """[n, num] items drawn uniformly from those outside each user's history and target (vectorised)."""
    n = len(windows)
    if num_items - 1 < num:
        raise ConfigError(f"the sampled protocol needs more than {num} items, the catalogue has {num_items}")
    rng = np.random.default_rng(seed)
    hist_rows = np.repeat(np.arange(n), windows.lengths)
    hist_items = windows.items[_ranges(windows.starts, windows.ends)]
    keys_seen = np.unique(
        np.concatenate([hist_rows, np.arange(n)]) * (num_items + 1) + np.concatenate([hist_items, windows.targets])
    )
    short = int((num_items - np.bincount(keys_seen // (num_items + 1), minlength=n) < num).sum())
    if short:
        raise ConfigError(f"the sampled protocol needs {num} unseen items per user; {short} users have fewer")
    out = np.zeros((n, num), dtype=np.int32)
    filled = np.zeros(n, dtype=np.int64)
    while (todo := np.flatnonzero(filled < num)).size:
        draw = rng.integers(1, num_items + 1, size=(len(todo), num * 2))
        keys = todo[:, None] * (num_items + 1) + draw
        ok = ~np.isin(keys, keys_seen)
        for r, row in enumerate(todo):  # rows left after the first pass are few
            got = draw[r][ok[r]][: num - filled[row]]
            out[row, filled[row] : filled[row] + len(got)] = got
            filled[row] += len(got)
    return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for every window, without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total) + offsets


@dataclass(frozen=True)
class Ranking:
    ranks: np.ndarray  # [n] 0-based
    top: np.ndarray | None  # [n, COVERAGE_K] top items (full protocol only)
    nll: np.ndarray | None = None  # [n] cross-entropy of each target (rank(..., loss=True) only)

    def summary(self, num_items: int) -> dict[str, float]:
        out = metrics.summarize(self.ranks)
        if self.top is not None:
            out[f"coverage@{COVERAGE_K}"] = metrics.coverage(self.top, num_items)
        if self.nll is not None:
            # the validation loss: the mean full-softmax cross-entropy of the held-out targets under the same
            # scores, comparable with a `ce` run's train_loss (without label smoothing; bce / sampled train on
            # another loss, so there only its trend means something)
            out["loss"] = float(np.mean(self.nll, dtype=np.float64)) if len(self.nll) else float("nan")
        out["users"] = len(self.ranks)
        return out


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of `limit` of `n` rows (all of them when `limit` is 0 or ≥ n)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7919]).choice(n, size=limit, replace=False))


def eval_batch_size(num_items: int, requested: int, num_devices: int = 1) -> int:
    """Caps B so a [B, V] score block stays around 64M floats; a multiple of the device count."""
    b = max(1, min(requested, 2**26 // (num_items + 1)))
    return max(num_devices, b // num_devices * num_devices)


def rank(
    score_fn: ScoreFn,
    windows: SequenceSet,
    num_items: int,
    max_len: int,
    *,
    protocol: str = "full",
    exclude_seen: bool = True,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool = False,
    desc: str = "evaluate",
    position: int | None = None,
    loss: bool = False,
) -> Ranking:
    """Ranks every window's target with `score_fn` in fixed-size batches (the last one padded); `loss` also
    computes each target's cross-entropy under the scores (`Ranking.nll`), for a model's scores (logits).
    `progress` draws a bar named `desc` (at line `position` under an enclosing bar).

    In a multi-process run each process scores its own block of every batch (`batch_size` is the global batch, a
    multiple of the process count) and the ranks are gathered, so every process returns the same Ranking. A
    model scorer returns the batch's scores as one global array split over the devices; a numpy scorer (the
    baselines) scores the process's rows only."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    targets = windows.targets
    if targets is None:
        raise ConfigError("these windows have no targets to rank")
    n = len(windows)
    negs = sample_unseen(windows, num_items, seed=seed) if protocol == "sampled" else None
    procs, me = jax.process_count(), jax.process_index()
    if batch_size % procs:
        raise ConfigError(f"the evaluation batch ({batch_size}) must be a multiple of the process count ({procs})")
    per = batch_size // procs
    ranks, tops, nlls = [], [], []
    from tqdm.auto import tqdm

    batches = tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False, position=position)
    for lo in batches:
        rows = np.arange(min(lo + me * per, n), min(lo + (me + 1) * per, n))  # this process's block
        pad = per - len(rows)
        part = windows.take(rows)
        seq = np.pad(part.padded(max_len), ((0, pad), (0, 0)))
        t = np.pad(targets[rows], (0, pad), constant_values=1)
        negs_rows = np.pad(negs[rows], ((0, pad), (0, 0)), constant_values=1) if negs is not None else None
        scores = score_fn(seq)
        if isinstance(scores, jax.Array) and not scores.is_fully_addressable:  # a global array: rank it sharded
            sharding = scores.sharding
            if not isinstance(sharding, NamedSharding):
                raise TypeError(f"a global score array must have a NamedSharding, not a {type(sharding).__name__}")
            mine = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0]))
            seq, t = (jax.make_array_from_process_local_data(mine, a) for a in (seq, t))
            if negs_rows is not None:
                negs_rows = jax.make_array_from_process_local_data(mine, negs_rows)
        if protocol == "full":
            r, top = _rank_full(scores, seq, t, jnp.asarray(exclude_seen))
            tops.append(distributed.allgather(top)[: min(batch_size, n - lo)])
        else:
            r = _rank_sampled(scores, t, negs_rows)
        ranks.append(distributed.allgather(r)[: min(batch_size, n - lo)])
        if loss:
            nlls.append(distributed.allgather(_nll(scores, t))[: min(batch_size, n - lo)])
    return Ranking(
        np.concatenate(ranks) if ranks else np.zeros(0, np.int64),
        np.concatenate(tops) if tops else None,
        (np.concatenate(nlls) if nlls else np.zeros(0, np.float32)) if loss else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Baselines, scored through the same ranking code
# ---------------------------------------------------------------------------------------------------------


def item_counts(train: SequenceSet, num_items: int) -> np.ndarray:
    return np.bincount(train.items[_ranges(train.starts, train.ends)], minlength=num_items + 1).astype(np.float64)


def random_scorer(num_items: int, seed: int = 0) -> ScoreFn:
    rng = np.random.default_rng(seed)
    return lambda seq: rng.random((len(seq), num_items + 1), dtype=np.float32)


def popular_scorer(train: SequenceSet, num_items: int) -> ScoreFn:
    counts = item_counts(train, num_items).astype(np.float32)
    return lambda seq: np.broadcast_to(counts, (len(seq), num_items + 1))


def markov_scorer(train: SequenceSet, num_items: int, popularity: np.ndarray | None = None) -> ScoreFn:
    """First-order Markov chain: counts of each next item after the session's last item; popularity breaks
    ties (scaled below one count, so it never outranks an observed transition). `popularity` ([V + 1] counts)
    replaces the item counts of `train` for that, e.g. when the windows are transition pairs."""
    idx = _ranges(train.starts, train.ends)
    same_user = np.repeat(np.arange(len(train)), train.lengths)
    prev, nxt = train.items[idx[:-1]].astype(np.int64), train.items[idx[1:]].astype(np.int64)
    keep = same_user[:-1] == same_user[1:]
    keys, counts = np.unique(prev[keep] * (num_items + 1) + nxt[keep], return_counts=True)
    row_of_key = keys // (num_items + 1)
    indptr = np.searchsorted(row_of_key, np.arange(num_items + 2))
    cols = (keys % (num_items + 1)).astype(np.int64)
    pop = item_counts(train, num_items) if popularity is None else np.asarray(popularity, np.float64)
    tiebreak = (pop / (pop.max() + 1.0)).astype(np.float32)

    def score(seq: np.ndarray) -> np.ndarray:
        last = seq[:, -1].astype(np.int64)
        out = np.tile(tiebreak, (len(seq), 1))
        lo, hi = indptr[last], indptr[last + 1]
        rows = np.repeat(np.arange(len(seq)), hi - lo)
        pos = _ranges(lo, hi)
        out[rows, cols[pos]] += counts[pos]
        return out

    return score


def baseline_scorers(train: SequenceSet, num_items: int, seed: int = 0) -> dict[str, ScoreFn]:
    return {
        "random": random_scorer(num_items, seed),
        "popular": popular_scorer(train, num_items),
        "markov": markov_scorer(train, num_items),
    }


def evaluate_split(
    scorer: ScoreFn,
    split,
    model_cfg,
    cfg,
    *,
    protocol: str = "full",
    which: str = "test",
    baselines: bool = True,
    seed: int = 0,
    test_users: int = 0,
    valid_users: int = 0,
    devices=None,
    progress: bool = False,
    log=logs.info,
) -> dict:
    """The estimator's evaluation: the model on `which` (and, for test, on validation too) and, with `baselines`,
    the random, popular and Markov baselines on the same users, under `protocol`. `test_users` / `valid_users`
    (0: all) rank a seeded sample (seed `cfg.seed`); the sample sizes are reported under "sample"."""
    import time

    from sasrec_jax.train import memory_errors

    if which not in ("test", "valid"):
        raise ConfigError(f"which must be 'test' or 'valid', got {which!r}")
    for name, value in (("test_users", test_users), ("valid_users", valid_users)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0 (0: all users), got {value!r}")
    test = split.test.take(sample_rows(len(split.test), test_users, cfg.seed))
    valid = split.valid.take(sample_rows(len(split.valid), valid_users, cfg.seed))
    windows = test if which == "test" else valid
    V, L = model_cfg.num_items, model_cfg.max_len
    n_devices = len(devices or jax.devices()) if jax.process_count() > 1 else 1
    bs = eval_batch_size(V, cfg.eval_batch_size, n_devices)
    kw = dict(protocol=protocol, exclude_seen=cfg.exclude_seen, batch_size=bs, seed=seed, progress=progress)
    # (result key, the bar's description, scorer, windows): the bars say what each ranking is
    label = "test" if which == "test" else "validation"
    jobs = [(which, f"{label}: SASRec", scorer, windows)]
    if which == "test":
        jobs.insert(0, ("valid", "validation: SASRec", scorer, valid))
    if baselines:
        jobs += [(name, f"{label}: {name}", fn, windows) for name, fn in baseline_scorers(split.train, V, seed).items()]
    of = len(split.test if which == "test" else split.valid)
    log(
        f"evaluation ({protocol}): {len(windows):,} of {of:,} {which} users"
        + (f", {len(valid):,} validation users" if which == "test" else "")
        + (", with the random, popular and Markov baselines" if baselines else "")
    )
    result: dict[str, Any] = {}  # the metrics of "valid"/"test", then "baselines", "protocol", "sample"
    base: dict[str, dict] = {}
    started = time.perf_counter()
    with memory_errors("evaluation", model_cfg, cfg, cfg.batch_size), distributed.lost_peers():
        for name, desc, fn, win in jobs:
            summary = rank(fn, win, V, L, desc=desc, **kw).summary(V)
            (result if name in ("valid", "test") else base)[name] = summary
    log(f"evaluation took {time.perf_counter() - started:.1f} s")
    if baselines:
        result["baselines"] = base
        warning = weak_model_warning(result)
        if warning:
            log(warning)
    result["protocol"] = protocol
    result["sample"] = {
        "seed": cfg.seed,
        "valid_users": len(valid),
        "valid_of": len(split.valid),
        "test_users": len(test),
        "test_of": len(split.test),
    }
    return result


def weak_model_warning(metrics: dict) -> str | None:
    """The warning for a model whose test NDCG@10 is not above the popular baseline's (None when it is, or when
    there is no baseline or test result to compare): such a model is not worth serving, and the usual cause is a
    run too short for the data."""
    popular = metrics.get("baselines", {}).get("popular")
    if popular is None or "test" not in metrics:
        return None
    ours, theirs = metrics["test"]["NDCG@10"], popular["NDCG@10"]
    if ours > theirs:
        return None
    return (
        f"warning: the model's test NDCG@10 ({ours:.4f}) is not above the popular baseline's ({theirs:.4f}): it is "
        "not worth serving yet. The time budget or the epochs were likely too small for this data: train longer "
        "(a larger --max-minutes or --epochs; --resume continues this run) and check in history.csv (or "
        "`sasrec-jax plot RUN_DIR`) that the validation NDCG@10 was still rising"
    )


def tidy(result: dict) -> pd.DataFrame:
    """`evaluate_split`'s nested metrics as a tidy DataFrame: one row per (split, model, metric)."""
    rows = [(split, "SASRec", m, v) for split in ("valid", "test") for m, v in result.get(split, {}).items()]
    split = "test" if "test" in result else "valid"
    for name, values in result.get("baselines", {}).items():
        rows += [(split, name, m, v) for m, v in values.items()]
    return pd.DataFrame(rows, columns=["split", "model", "metric", "value"])
