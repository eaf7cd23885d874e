"""The prefix-example protocol of the LSTM session model (what benchmarks/synthetic_sessions.py measures SASRec
with, against Markov, popular and the published LSTM+attention figures).

For a user sequence s1..sn every prefix is one example, (s1..st) -> s(t+1) for t = 1..n-1. The examples are split
uniformly at random (seeded): 20% test, and of the other 80% a 5% validation subset; the rest trains. SASRec
trains on all positions of a sequence at once, so the loss at a position whose target is a validation or test
example is masked (its target set to PAD, weight 0); the held-out items stay in the *inputs* of later positions,
exactly as later prefixes contain them in the LSTM protocol. Test ranks each prefix's target against all items,
without excluding the prefix's items (repeats are legitimate in that protocol); ties count against the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sasrec_serve.ids import PAD

from sasrec_jax import data, evaluate, logs, metrics, train
from sasrec_jax.config import ModelConfig, TrainConfig, to_dict
from sasrec_jax.data import Sequences, SequenceSet
from sasrec_jax.prepare import auto_max_len

PUBLISHED_LSTM = {"Hit@10": 0.179, "Hit@20": 0.256, "MRR@20": 0.110, "users": 20_000, "items": 5_000}
TEST_FRAC = 0.2
VALID_FRAC = 0.05  # of the training examples


# ---------------------------------------------------------------------------------------------------------
# The protocol: prefix examples, their random split, and masked SASRec training rows
# ---------------------------------------------------------------------------------------------------------


def example_targets(seqs: Sequences) -> np.ndarray:
    """Flat event index j of every example's target: every event but each user's first (int64, sorted).

    Example j is the prefix `seqs.items[offsets[u]:j]` of its user u with target `seqs.items[j]`."""
    first = np.zeros(seqs.num_events, dtype=bool)
    first[seqs.offsets[:-1][seqs.lengths > 0]] = True
    return np.flatnonzero(~first)


@dataclass(frozen=True)
class ExampleSplit:
    """Target event indices (each sorted, disjoint, together all examples) of the three parts."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_examples(targets: np.ndarray, seed: int, test_frac=TEST_FRAC, valid_frac=VALID_FRAC) -> ExampleSplit:
    """A seeded uniform random split: `test_frac` of the examples test, `valid_frac` of the rest validate."""
    order = np.random.default_rng(seed).permutation(len(targets))
    n_test = int(round(test_frac * len(targets)))
    n_valid = int(round(valid_frac * (len(targets) - n_test)))
    test, valid, rest = order[:n_test], order[n_test : n_test + n_valid], order[n_test + n_valid :]
    return ExampleSplit(*(np.sort(targets[part]) for part in (rest, valid, test)))


def prefix_windows(seqs: Sequences, targets: np.ndarray) -> SequenceSet:
    """The examples as windows: the whole prefix before each target event, with the target item."""
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)[targets]
    return SequenceSet(seqs.items, seqs.offsets[user], targets, user, seqs.items[targets])


def masked_training_rows(seqs: Sequences, train_targets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec (inputs, targets) int32 [n, max_len] over every user's whole history (`training_rows(…, "all")`:
    each target position once, with its left context) in which only the targets of `train_targets` remain:
    every other target position is PAD, so `train.make_batch` gives it no loss. Inputs are left untouched."""
    users = seqs.as_set()
    inputs, targets = users.training_rows(max_len, "all")
    # the same windows over event positions (1-based, 0 = padding) tell which event each target cell is
    positions = SequenceSet(np.arange(1, seqs.num_events + 1, dtype=np.int32), users.starts, users.ends, users.users)
    _, target_pos = positions.training_rows(max_len, "all")
    has_target = (target_pos != PAD).any(axis=1)  # a one-event user's row has none
    inputs, targets, target_pos = inputs[has_target], targets[has_target], target_pos[has_target]
    trains = np.zeros(seqs.num_events + 1, dtype=bool)
    trains[np.asarray(train_targets) + 1] = True
    return inputs, np.where(trains[target_pos], targets, PAD).astype(np.int32)


@dataclass(frozen=True)
class MaskedRows:
    """The training side of this protocol's split: `train.fit` trains on `split.train.training_rows(...)`, which
    here are the masked rows (held-out targets set to PAD, so they add no loss)."""

    inputs: np.ndarray
    targets: np.ndarray

    def training_rows(self, max_len: int, windows: str) -> tuple[np.ndarray, np.ndarray]:
        if self.inputs.shape[1] != max_len:
            raise ValueError(f"the masked rows have width {self.inputs.shape[1]}, the model max_len {max_len}")
        return self.inputs, self.targets


def baseline_scorers(seqs: Sequences, train_targets: np.ndarray) -> dict[str, evaluate.ScoreFn]:
    """Popular and first-order Markov, fitted on the training examples only (through the library's scorers)."""
    num_items = seqs.vocab.size
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)[train_targets]
    just_targets = SequenceSet(seqs.items, train_targets, train_targets + 1, user)
    counts = evaluate.item_counts(just_targets, num_items)
    pairs = SequenceSet(seqs.items, train_targets - 1, train_targets + 1, user)  # (prefix's last item, target)
    return {
        "Markov": evaluate.markov_scorer(pairs, num_items, popularity=counts),
        "popular": evaluate.popular_scorer(just_targets, num_items),
    }


def summarize(ranking: evaluate.Ranking) -> dict:
    r = ranking.ranks
    return {
        "Hit@10": metrics.hit_rate(r, 10),
        "Hit@20": metrics.hit_rate(r, 20),
        "MRR@20": metrics.mrr(r, 20),
        "NDCG@10": metrics.ndcg(r, 10),
        "examples": int(len(r)),
    }


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def run(
    seqs: Sequences,
    *,
    seed: int = 0,
    model_kw: dict | None = None,
    train_kw: dict | None = None,
    progress: bool = False,
    log=logs.info,
) -> dict:
    """Splits the examples, trains SASRec on the masked rows, and ranks the test examples with it and the
    baselines. `model_kw`/`train_kw` override the library defaults (`max_len` defaults to `auto_max_len`)."""
    model_kw = dict(model_kw or {})
    num_items = seqs.vocab.size
    max_len = model_kw.pop("max_len", None) or auto_max_len(seqs.lengths)
    mc = ModelConfig(num_items=num_items, max_len=max_len, **model_kw)
    tc = TrainConfig(**{"seed": seed, **(train_kw or {}), "exclude_seen": False})

    parts = split_examples(example_targets(seqs), seed)
    valid, test = prefix_windows(seqs, parts.valid), prefix_windows(seqs, parts.test)
    rows = masked_training_rows(seqs, parts.train, max_len)
    # MaskedRows stands in for the training SequenceSet: train.fit only calls split.train.training_rows
    split = data.Split(MaskedRows(*rows), valid, test, "prefix_examples_80_20")  # type: ignore[arg-type]
    log(
        f"examples: {len(parts.train):,} train, {len(parts.valid):,} validation, {len(parts.test):,} test; "
        f"{len(rows[0]):,} training rows, max_len {max_len}"
    )

    t0 = time.perf_counter()
    result = train.fit(mc, tc, split, progress=progress, log=log)
    train_seconds = time.perf_counter() - t0
    eval_bs = evaluate.eval_batch_size(num_items, tc.eval_batch_size)
    scorers = {"SASRec (ours)": train.make_scorer(result.graphdef, train.Placement.create())(result.params)}
    scorers.update(baseline_scorers(seqs, parts.train))
    results = {
        name: summarize(evaluate.rank(fn, test, num_items, max_len, exclude_seen=False, batch_size=eval_bs))
        for name, fn in scorers.items()
    }
    return {
        "examples": {"train": len(parts.train), "valid": len(parts.valid), "test": len(parts.test)},
        "training_rows": int(len(rows[0])),
        "model": to_dict(mc),
        "train": to_dict(tc),
        "training": {
            "epochs": result.loop.epoch,
            "best_epoch": result.loop.best_epoch,
            "best_valid_ndcg@10": result.loop.best_metric,
            "stopped": result.loop.stopped or f"completed {result.loop.epoch} epochs",
            "seconds": round(train_seconds, 1),
            "history": result.loop.history,
        },
        "results": results,
    }
