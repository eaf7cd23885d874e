"""The prefix-example protocol (sasrec_jax.prefix_protocol, measured by benchmarks/synthetic_sessions.py): the split
is a partition, held-out targets never reach the loss (but stay in the inputs), baselines see training examples
only, and a tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
from sasrec_serve.ids import PAD

from sasrec_jax import data, evaluate, train
from sasrec_jax import prefix_protocol as ss
from sasrec_jax.batches import make_batch
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.data import ItemVocab, Sequences
from sasrec_jax.errors import TrainingError
from sasrec_jax.synthetic import generate_sessions


def unique_item_sequences(lengths) -> Sequences:
    """Every event is its own item (item = event index + 1), so a row's values name the events in it."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    items = np.arange(1, n + 1, dtype=np.int32)
    return Sequences(np.arange(len(lengths)), offsets, items, None, ItemVocab(np.arange(1, n + 1)))


@pytest.fixture(scope="module")
def tiny() -> Sequences:
    return data.from_interactions(generate_sessions(n_users=300, n_items=50, n_categories=5, seed=0).events)


def test_examples_are_every_event_but_each_users_first():
    seqs = unique_item_sequences([1, 2, 5, 3])
    assert ss.example_targets(seqs).tolist() == [2, 4, 5, 6, 7, 9, 10]


def test_the_example_split_is_a_seeded_partition(tiny):
    targets = ss.example_targets(tiny)
    assert len(targets) == int((tiny.lengths - 1).sum())
    parts = ss.split_examples(targets, seed=3)
    together = np.concatenate([parts.train, parts.valid, parts.test])
    assert len(together) == len(targets) and np.array_equal(np.sort(together), targets)  # disjoint, complete
    assert len(parts.test) == round(0.2 * len(targets))
    assert len(parts.valid) == round(0.05 * (len(targets) - len(parts.test)))
    again, other = ss.split_examples(targets, seed=3), ss.split_examples(targets, seed=4)
    assert np.array_equal(again.test, parts.test) and np.array_equal(again.valid, parts.valid)
    assert not np.array_equal(other.test, parts.test)
    # uniform over examples, not per user: some users have no test example, others several
    per_user = np.bincount(np.searchsorted(tiny.offsets, parts.test, side="right") - 1, minlength=tiny.num_users)
    assert per_user.min() == 0 and per_user.max() >= 3


def test_prefix_windows_are_the_whole_history_before_the_target():
    seqs = unique_item_sequences([3, 12])
    w = ss.prefix_windows(seqs, np.array([1, 2, 14]))
    assert w.padded(4).tolist() == [[0, 0, 0, 1], [0, 0, 1, 2], [11, 12, 13, 14]]  # the last max_len items
    assert w.targets.tolist() == [2, 3, 15]


@pytest.mark.parametrize("max_len", [4, 8, 40])
def test_only_training_targets_carry_loss_and_held_out_items_stay_in_the_inputs(max_len):
    lengths = [1, 2, 5, 9, 17, 30]  # some longer than max_len + 1: several rows per user
    seqs = unique_item_sequences(lengths)
    parts = ss.split_examples(ss.example_targets(seqs), seed=0)
    inputs, targets = ss.masked_training_rows(seqs, parts.train, max_len)
    assert inputs.shape == targets.shape and inputs.shape[1] == max_len

    # every training target exactly once, nothing else: no validation or test target, no user's first event
    events = np.sort(targets[targets != PAD] - 1)
    assert np.array_equal(events, parts.train)
    # through the library's batching: the positions that get loss weight are exactly those targets
    batch = make_batch(inputs, targets, len(inputs))
    weighted = batch.targets_BxL.reshape(-1)[batch.idx_SxN[0][batch.weight_SxN[0] > 0]]
    assert np.array_equal(np.sort(weighted - 1), parts.train)
    assert not np.isin(weighted - 1, np.concatenate([parts.valid, parts.test])).any()

    # each target cell sees its own user's preceding events (its full window), newest in the same column
    for row_in, row_t in zip(inputs, targets):
        seen = row_in[row_in != PAD]
        assert np.array_equal(seen, np.arange(seen[0], seen[-1] + 1))  # consecutive events
        user = np.searchsorted(seqs.offsets, seen[0] - 1, side="right") - 1
        assert seen[-1] - 1 < seqs.offsets[user + 1]  # of one user
        for col in np.flatnonzero(row_t):
            assert row_in[col] == row_t[col] - 1
            start = seqs.offsets[user]
            assert (row_in[: col + 1] != PAD).sum() == min(col + 1, row_t[col] - 1 - start)
    # held-out targets are masked as targets, yet present as inputs of later positions
    unmasked_inputs, _ = ss.masked_training_rows(seqs, ss.example_targets(seqs), max_len)
    assert np.array_equal(inputs, unmasked_inputs)
    last = seqs.offsets[1:] - 1
    held_out_not_last = np.setdiff1d(parts.test, last)
    assert len(held_out_not_last) and np.isin(held_out_not_last + 1, inputs).all()


def test_training_rows_come_from_the_split_and_all_masked_rows_are_refused(tiny):
    mc = ModelConfig(num_items=tiny.vocab.size, max_len=8, dim=8, num_blocks=1)
    split = data.leave_one_out(tiny)
    none = np.zeros((4, 8), np.int32)  # every target masked: nothing to learn from
    masked = data.Split(ss.MaskedRows(none, none), split.valid, split.test, "masked")
    with pytest.raises(TrainingError, match="nothing to learn"):
        train.fit(mc, TrainConfig(epochs=1), masked, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="width 8"):
        ss.MaskedRows(none, none).training_rows(16, "all")


def test_baselines_count_training_examples_only():
    # user 0: 1 2 3, user 1: 1 2 4, user 2: 1 4 (items are indices; item 5 appears nowhere)
    items = np.array([1, 2, 3, 1, 2, 4, 1, 4], np.int32)
    seqs = Sequences(np.arange(3), np.array([0, 3, 6, 8]), items, None, ItemVocab(np.arange(1, 6)))
    assert ss.example_targets(seqs).tolist() == [1, 2, 4, 5, 7]
    train_targets = np.array([1, 4, 5])  # 1->2, 1->2, 2->4; held out: 2->3 and 1->4
    scorers = ss.baseline_scorers(seqs, train_targets)
    seq = np.array([[0, 1], [0, 2], [0, 3]], np.int32)
    pop = scorers["popular"](seq)[0]
    assert pop[1:].tolist() == [0, 2, 0, 1, 0]  # targets only: inputs (item 1) and held-out targets do not count
    markov = scorers["Markov"](seq)
    assert markov[0].argmax() == 2 and markov[0, 4] < 1  # 1 -> 4 is held out: only the popularity tie-break
    assert markov[1].argmax() == 4 and markov[1, 3] < 1  # 2 -> 3 is held out
    assert np.argsort(-markov[2])[:2].tolist() == [2, 4]  # item 3 was never followed: popular order
    # the library's default tie-break (all items in the windows) differs: the override is what is used here
    pairs = data.SequenceSet(items, train_targets - 1, train_targets + 1, np.zeros(3, np.int64))
    assert evaluate.markov_scorer(pairs, 5)(seq)[2, 1] > 0 and markov[2, 1] == 0


def test_a_tiny_run_learns_and_reports_metrics_in_range(tiny):
    out = ss.run(
        tiny,
        seed=0,
        model_kw=dict(dim=16, num_blocks=1, dropout=0.0),
        train_kw=dict(epochs=2, lr=1e-2, batch_size=32, warmup_steps=5),
        log=lambda *_: None,
    )
    assert list(out["results"]) == ["SASRec (ours)", "Markov", "popular"]
    assert out["train"]["exclude_seen"] is False
    assert out["training"]["epochs"] == 2
    for r in out["results"].values():
        assert r["examples"] == out["examples"]["test"]
        assert 0.0 <= r["MRR@20"] <= r["Hit@20"] <= 1.0 and 0.0 <= r["Hit@10"] <= r["Hit@20"]
    ours, popular = out["results"]["SASRec (ours)"], out["results"]["popular"]
    assert ours["Hit@10"] > popular["Hit@10"] + 0.03 and ours["MRR@20"] > popular["MRR@20"]
