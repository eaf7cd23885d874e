"""Data layer on hand-built cases: ordering, ties, padding, truncation, splits, vocabulary, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sasrec_serve.ids import PAD, ItemVocab

from sasrec_jax import data
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.errors import ConfigError, DataError


def frame(rows, cols=("user_id", "item_id", "timestamp")):
    return pd.DataFrame(rows, columns=list(cols))


def seqs_of(s: data.Sequences) -> dict:
    return {u: s.vocab.decode(s.user_items(i)) for i, u in enumerate(s.users.tolist())}


def test_sorted_by_time_with_stable_ties():
    df = frame([("b", 30, 5), ("a", 10, 2), ("b", 20, 1), ("a", 11, 2), ("a", 12, 1), ("b", 21, 5)])
    s = data.from_interactions(df)
    # ties (a: 10 and 11 at t=2; b: 30 and 21 at t=5) keep the original row order
    assert seqs_of(s) == {"a": [12, 10, 11], "b": [20, 30, 21]}
    assert s.offsets.tolist() == [0, 3, 6]
    assert s.items.dtype == np.int32 and s.items.min() >= 1


def test_row_order_is_time_without_time_column():
    df = pd.DataFrame({"u": [1, 2, 1, 1], "i": ["x", "y", "z", "x"]})
    s = data.from_interactions(df, user_col="u", item_col="i", time_col=None)
    assert seqs_of(s) == {1: ["x", "z", "x"], 2: ["y"]}


def test_datetimes_and_iso_strings_are_timestamps():
    df = frame([(1, 5, "2024-01-02"), (1, 6, "2024-01-01"), (2, 5, "2024-03-01")])
    assert seqs_of(data.from_interactions(df))[1] == [6, 5]
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    assert seqs_of(data.from_interactions(df))[1] == [6, 5]


def test_dedupe_and_min_len():
    df = frame([(1, 5, 1), (1, 5, 2), (1, 6, 3), (1, 5, 4), (2, 7, 1), (2, 7, 2)])
    s = data.from_interactions(df, dedupe_consecutive=True)
    assert seqs_of(s) == {1: [5, 6, 5], 2: [7]}
    s = data.from_interactions(df, dedupe_consecutive=True, min_len=2)
    assert seqs_of(s) == {1: [5, 6, 5]}
    assert s.vocab.size == 2  # item 7 vanished with user 2


def test_vocab_round_trip_int_and_str():
    for ids in ([10, 3, 7], ["sku-1", "sku-2"]):
        vocab = ItemVocab(sorted(ids))
        again = ItemVocab(vocab.to_json())
        assert again.to_json() == sorted(ids)
        idx = again.indices(sorted(ids) + ["nope"])
        assert idx.tolist() == list(range(1, len(ids) + 1)) + [PAD]
        assert again.decode(idx[:-1]) == sorted(ids)
    # string queries find int ids (the CLI passes strings) and vice versa
    assert ItemVocab([5, 50]).indices(["50", 5, "x"]).tolist() == [2, 1, 0]
    assert ItemVocab(["5"]).indices([5]).tolist() == [1]


def test_pad_left_and_truncation():
    items = np.array([1, 2, 3, 4, 5, 6], np.int32)
    out = data.pad_left(items, np.array([0, 4, 2]), np.array([4, 6, 2]), 3)
    assert out.tolist() == [[2, 3, 4], [0, 5, 6], [0, 0, 0]]
    assert out.dtype == np.int32


def test_training_rows_are_shifted_by_one():
    s = data.from_interactions(frame([(1, 10, 1), (1, 20, 2), (1, 30, 3), (1, 40, 4)]))
    inputs, targets = s.as_set().training_rows(5)
    assert s.vocab.decode(inputs[0][inputs[0] > 0]) == [10, 20, 30]
    assert s.vocab.decode(targets[0][targets[0] > 0]) == [20, 30, 40]
    assert inputs[0, :2].tolist() == [0, 0]  # left padding
    inputs, targets = s.as_set().training_rows(2)  # truncated to the most recent items
    assert s.vocab.decode(inputs[0]) == [20, 30] and s.vocab.decode(targets[0]) == [30, 40]


@pytest.mark.parametrize("max_len", [1, 2, 3, 4, 7, 50])
def test_training_rows_all_windows_make_every_step_a_target_once(max_len):
    lengths = np.array([1, 2, 3, 5, 7, 8, 13, 30])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    items = np.arange(1, ends[-1] + 1, dtype=np.int32)  # item k sits at position k - 1: values name positions
    ss = data.SequenceSet(items, starts, ends, np.arange(len(lengths)))
    inputs, targets = ss.training_rows(max_len, "all")
    last_inputs, last_targets = ss.training_rows(max_len)
    # each user's first row is its last-window row, unchanged
    firsts = np.r_[0, np.cumsum(1 + np.maximum(lengths - 2, 0) // max_len)[:-1]]
    assert (inputs[firsts] == last_inputs).all() and (targets[firsts] == last_targets).all()
    trained = []
    for row_in, row_t in zip(inputs, targets):
        for j in np.flatnonzero(row_t):
            ctx = row_in[: j + 1][row_in[: j + 1] > 0]
            t = int(row_t[j]) - 1
            user = np.searchsorted(ends, t, side="right")
            # the context is the items right before the target, inside the target's own sequence
            assert ctx.tolist() == items[t - len(ctx) : t].tolist() and t - len(ctx) >= starts[user]
            trained.append(t)
    # every position after a sequence's first is a target exactly once
    expected = [t for s_, e in zip(starts, ends) for t in range(s_ + 1, e)]
    assert sorted(trained) == expected
    assert (~(targets > 0).any(axis=1)).sum() == (lengths < 2).sum()  # only 1-item users give empty rows
    with pytest.raises(DataError, match="windows"):
        ss.training_rows(max_len, "some")


def test_leave_one_out():
    rows = [(1, i, t) for t, i in enumerate([1, 2, 3, 4, 5])]
    rows += [(2, 7, 0), (2, 8, 1)] + [(3, 9, 0), (3, 1, 1), (3, 2, 2)]
    s = data.from_interactions(frame(rows))
    split = data.leave_one_out(s)
    dec = s.vocab.decode
    tr = split.train
    train = {s.users[u]: dec(tr.items[a:b]) for u, a, b in zip(tr.users, tr.starts, tr.ends)}
    assert train == {1: [1, 2, 3], 2: [7, 8], 3: [9]}  # user 2 (< 3 items) trains only
    assert s.users[split.valid.users].tolist() == [1, 3]
    assert dec(split.valid.targets) == [4, 1] and dec(split.test.targets) == [5, 2]
    assert dec(split.test.padded(4)[0][split.test.padded(4)[0] > 0]) == [1, 2, 3, 4]  # test input holds valid item


def test_time_split():
    rows = [(1, 1, 1), (1, 2, 2), (1, 3, 8), (1, 4, 10), (2, 5, 3), (2, 6, 9), (3, 7, 1), (3, 8, 2)]
    s = data.from_interactions(frame(rows))
    split = data.time_split(s, valid_frac=0.25, test_frac=0.25)
    assert split.kind == "time"
    assert len(split.test) >= 1
    # every target comes after every training event of its own window
    for w in (split.valid, split.test):
        for a, b, t_idx in zip(w.starts, w.ends, np.arange(len(w))):
            assert s.times[b] >= s.times[a:b].max()
            assert w.targets[t_idx] == s.items[b]


def test_fingerprint_changes_with_data():
    a = data.from_interactions(frame([(1, 1, 1), (1, 2, 2)]))
    b = data.from_interactions(frame([(1, 1, 1), (1, 3, 2)]))
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == data.from_interactions(frame([(1, 1, 1), (1, 2, 2)])).fingerprint()


@pytest.mark.parametrize(
    "df, kwargs, message",
    [
        (frame([(1, 2, 3)]), {"item_col": "movie"}, "column 'movie' not found"),
        (frame([(1, None, 3), (1, 2, 4)]), {}, "'item_id' has 1 missing"),
        (frame([(float("nan"), 1, 3)]), {}, "'user_id' has 1 missing"),
        (frame([(1, 2, "yesterday-ish")]), {}, "neither numbers nor dates"),
        (frame([(1, 2, None), (1, 3, 4)]), {}, "missing timestamps"),
        (frame([]), {}, "empty"),
    ],
)
def test_bad_input_names_the_problem(df, kwargs, message):
    with pytest.raises(DataError, match=message):
        data.from_interactions(df, **kwargs)


def test_no_user_long_enough_for_leave_one_out():
    s = data.from_interactions(frame([(1, 1, 1), (1, 2, 2), (2, 1, 1)]))
    with pytest.raises(DataError, match="at least 3 interactions"):
        data.leave_one_out(s)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="max_len"):
        ModelConfig(num_items=10, max_len=0)
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        ModelConfig(num_items=10, dim=10, num_heads=3)
    with pytest.raises(ConfigError, match="train_windows must be last or all"):
        TrainConfig(train_windows="every")


def test_read_table_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        data.read_table(empty, "csv")
    with pytest.raises(DataError, match="not found"):
        data.read_table(tmp_path / "missing.csv", "csv")
    with pytest.raises(DataError, match="unknown format"):
        data.read_table(empty, "xlsx")


def test_csv_and_parquet_round_trip(tmp_path, cycle_df):
    cycle_df.to_csv(tmp_path / "x.csv", index=False)
    cycle_df.to_parquet(tmp_path / "x.parquet")
    a = data.from_interactions(data.read_table(tmp_path / "x.csv", "csv"))
    b = data.from_interactions(data.read_table(tmp_path / "x.parquet", "parquet"))
    assert a.fingerprint() == b.fingerprint() == data.from_interactions(cycle_df).fingerprint()


def test_nanosecond_timestamps_keep_their_order():
    base = 1_700_000_000_000_000_000  # beyond 2**53: a float64 round trip would merge these
    df = frame([(1, 10, base + 2), (1, 20, base), (1, 30, base + 1)])
    assert seqs_of(data.from_interactions(df))[1] == [20, 30, 10]
