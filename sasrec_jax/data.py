"""Interactions → item vocabulary → time-ordered per-user sequences → splits and left-padded batches (numpy only)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sasrec_serve import ids as id_policy
from sasrec_serve.ids import PAD, ItemVocab

from sasrec_jax.config import FORMATS
from sasrec_jax.errors import DataError

# ---------------------------------------------------------------------------------------------------------
# Sequences: a CSR layout (flat item array + per-user offsets), built without a Python loop per user
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sequences:
    """Every user's items in time order: user u owns `items[offsets[u]:offsets[u + 1]]`."""

    users: np.ndarray  # [U] external user ids
    offsets: np.ndarray  # [U + 1] int64
    items: np.ndarray  # [N] int32 item indices 1..V
    times: np.ndarray | None  # [N] int64, or None when only the order is known
    vocab: ItemVocab

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_events(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return self.num_users

    def user_items(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def as_set(self) -> SequenceSet:
        return SequenceSet(self.items, self.offsets[:-1].copy(), self.offsets[1:].copy(), np.arange(len(self)))

    def fingerprint(self) -> str:
        """A short content hash: a run directory records it, and evaluation checks it sees the same data."""
        h = hashlib.sha256()
        for arr in (self.offsets, self.items):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(repr(self.vocab.to_json()[:1000]).encode())
        h.update(str(self.vocab.size).encode())
        return h.hexdigest()[:16]

    def stats(self) -> dict:
        lengths = self.lengths
        return {
            "users": int(self.num_users),
            "items": int(self.vocab.size),
            "interactions": int(self.num_events),
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "median_length": float(np.median(lengths)) if len(lengths) else 0.0,
            "max_length": int(lengths.max()) if len(lengths) else 0,
        }


@dataclass(frozen=True, eq=False)
class SequenceSet:
    """Windows `items[starts[i]:ends[i]]` of a flat item array, optionally with the next item as a target."""

    items: np.ndarray  # [N] int32, shared with the Sequences it came from (no copy)
    starts: np.ndarray  # [n] int64
    ends: np.ndarray  # [n] int64
    users: np.ndarray  # [n] row index of the user in the Sequences
    targets: np.ndarray | None = None  # [n] int32

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def take(self, rows: np.ndarray) -> SequenceSet:
        t = None if self.targets is None else self.targets[rows]
        return SequenceSet(self.items, self.starts[rows], self.ends[rows], self.users[rows], t)

    def padded(self, max_len: int) -> np.ndarray:
        """Left-padded int32 [n, max_len] of the most recent `max_len` items of each window."""
        return pad_left(self.items, self.starts, self.ends, max_len)

    def training_rows(self, max_len: int, windows: str = "last") -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int32 [n, max_len]: targets are the inputs shifted by one step.

        windows="last" keeps the most recent `max_len` steps of each sequence (the original SASRec);
        "all" also cuts the older history into further rows ending `max_len`, 2·`max_len`, … steps earlier, so
        every item after a sequence's first is a target exactly once (with up to `max_len` items of context)."""
        starts, ends = self.starts, self.ends
        if windows == "all":
            extra = np.maximum(self.lengths - 2, 0) // max_len  # older rows that still hold >= 1 target
            rows = np.repeat(np.arange(len(starts)), extra + 1)
            back = np.arange(len(rows)) - np.repeat(np.cumsum(extra + 1) - (extra + 1), extra + 1)
            starts, ends = starts[rows], ends[rows] - back * max_len
        elif windows != "last":
            raise DataError(f"windows must be 'last' or 'all', got {windows!r}")
        inputs = pad_left(self.items, starts, ends - 1, max_len)
        targets = pad_left(self.items, starts + 1, ends, max_len)
        return inputs, targets


def pad_left(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """Left-padded int32 [n, max_len]: the newest item of each window always sits in the last column."""
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    n = len(starts)
    out = np.zeros((n, max_len), dtype=np.int32)
    cols = np.arange(-max_len, 0, dtype=np.int64)
    chunk = max(1, 2**22 // max_len)  # bound the int64 index temporaries (~32 MB) for very large sets
    for lo in range(0, n, chunk):
        e = ends[lo : lo + chunk, None]
        idx = e + cols
        valid = idx >= starts[lo : lo + chunk, None]
        out[lo : lo + chunk] = np.where(valid, items[np.where(valid, idx, 0)], PAD)
    return out


# ---------------------------------------------------------------------------------------------------------
# From a DataFrame
# ---------------------------------------------------------------------------------------------------------


def _require_columns(df: pd.DataFrame, cols: dict[str, str | None]) -> None:
    for flag, col in cols.items():
        if col is not None and col not in df.columns:
            raise DataError(
                f"column {col!r} not found (available: {list(map(str, df.columns))}); name the right one with {flag}"
            )


def _check_ids(series: pd.Series, col: str) -> None:
    missing = series.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise DataError(f"column {col!r} has {int(missing.sum())} missing (NaN/None) ids; first at row {first}")


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


_TIME_HINT = "pass numbers (e.g. unix seconds), datetimes or ISO-8601 strings (with or without Z / an offset)"


def _timestamps(series: pd.Series, col: str) -> np.ndarray:
    """int64 timestamps from numbers, datetimes (naive, or timezone-aware: normalised to UTC) or strings of either;
    anything else is a DataError naming the column."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):  # what Spark and pd.to_datetime(utc=True) write
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(series):
        if series.isna().any():
            raise DataError(f"column {col!r} has missing timestamps (first at row {_first(series.isna())})")
        try:
            return series.astype("datetime64[ns]").to_numpy().astype(np.int64)
        except (ValueError, OverflowError) as e:  # outside the years 1678-2261 that int64 nanoseconds hold
            raise DataError(f"column {col!r} has timestamps out of range ({e})") from None
    if pd.api.types.is_bool_dtype(series):
        raise DataError(f"column {col!r} holds booleans, not timestamps")
    if pd.api.types.is_complex_dtype(series):
        raise DataError(f"column {col!r} holds complex numbers, not timestamps; {_TIME_HINT}")
    if pd.api.types.is_integer_dtype(series):
        if series.isna().any():  # nullable integer columns
            raise DataError(f"column {col!r} has missing timestamps (first at row {_first(series.isna())})")
        return series.to_numpy(dtype=np.int64)  # no float round trip: ns timestamps exceed 2**53
    values = series
    if not pd.api.types.is_numeric_dtype(series):
        kinds = pd.api.types.infer_dtype(series, skipna=True)
        if kinds in ("mixed", "bytes", "complex", "boolean", "period", "interval", "timedelta", "categorical"):
            odd = series.map(lambda v: not isinstance(v, (str, int, float, np.number, pd.Timestamp)) or
                             isinstance(v, (bool, np.bool_)))  # fmt: skip
            if odd.any():
                row = _first(odd)
                raise DataError(
                    f"column {col!r} holds {int(odd.sum()):,} values of type {type(series.iloc[row]).__name__}, which "
                    f"are no timestamps (e.g. {series.iloc[row]!r} at row {row}); {_TIME_HINT}"
                )
        values = pd.to_numeric(series, errors="coerce")
        bad = values.isna() & series.notna()
        if bad.any():
            return _timestamps(_parse_dates(series, col, int(np.flatnonzero(bad.to_numpy())[0])), col)
        if pd.api.types.is_integer_dtype(values):
            return _timestamps(values, col)
    arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(arr).any():
        raise DataError(f"column {col!r} has missing timestamps (first at row {_first(np.isnan(arr))})")
    if not np.isfinite(arr).all():
        raise DataError(f"column {col!r} has infinite timestamps")
    if np.all(arr == np.round(arr)) and np.abs(arr).max(initial=0) < 2**53:
        return arr.astype(np.int64)
    return np.argsort(np.argsort(arr, kind="stable"), kind="stable").astype(np.int64)  # fractional: keep order


def _parse_dates(series: pd.Series, col: str, first_text: int) -> pd.Series:
    """Date strings (or datetime objects) as UTC datetimes: ISO-8601 with Z or offsets (mixed offsets too),
    naive ones taken as UTC; other formats pandas can infer per element."""
    for fmt in ("ISO8601", "mixed"):
        try:
            return pd.to_datetime(series, format=fmt, utc=True)
        except (ValueError, TypeError, OverflowError):
            continue
    try:
        unparsed = pd.to_datetime(series, format="mixed", utc=True, errors="coerce").isna() & series.notna()
        first_text = _first(unparsed) if unparsed.any() else first_text
    except (ValueError, TypeError, OverflowError):
        pass
    raise DataError(
        f"column {col!r} has timestamps that are neither numbers nor dates (e.g. {series.iloc[first_text]!r} at row "
        f"{first_text}); {_TIME_HINT}"
    )


def _factorize(values: pd.Series, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques) of an id column under the id policy (`sasrec_serve.ids`: all integers or all strings, int64
    range), uniques sorted so that indices do not depend on row order."""
    if pd.api.types.infer_dtype(values, skipna=False) == "string":  # all str: the policy holds, skip its loop
        arr = values.to_numpy(dtype=object)
    else:
        try:
            arr = id_policy.normalize(values.to_numpy(), col)
        except id_policy.IdError as e:
            raise DataError(str(e)) from None
    codes, uniques = pd.factorize(arr, sort=True)
    uniques = np.asarray(uniques)
    if arr.dtype == object:
        uniques = id_policy.objects([str(v) for v in uniques])
    return codes.astype(np.int64), uniques


def _user_time_order(user_codes: np.ndarray, num_users: int, times: np.ndarray) -> np.ndarray:
    """Stable order by (user, time). One argsort of a combined int64 key is ~3x faster than lexsort; lexsort
    remains for time spans too wide to combine."""
    t0 = int(times.min())
    span = int(times.max()) - t0 + 1
    if span * num_users < 2**62:
        return np.argsort(user_codes * span + (times - t0), kind="stable")
    return np.lexsort((times, user_codes))  # stable: ties keep row order


def _compact(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(surviving original codes, codes renumbered 0..k-1 in the same order)."""
    present = np.bincount(codes, minlength=n) > 0
    return np.flatnonzero(present), (np.cumsum(present) - 1)[codes]


def from_interactions(
    df: pd.DataFrame,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    dedupe_consecutive: bool = False,
    min_len: int = 1,
) -> Sequences:
    """Builds time-ordered sequences from (user, item[, time]) rows.

    Rows are sorted by user, then time; ties keep the original row order. Without `time_col` (or when
    the column is absent and `time_col` is the default), the row order is the time order.
    """
    if not isinstance(df, pd.DataFrame):
        try:  # polars and other dataframe-protocol objects
            df = df.to_pandas()
        except AttributeError:
            raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}") from None
    if time_col == "timestamp" and time_col not in df.columns:
        time_col = None
    _require_columns(df, {"--user-col": user_col, "--item-col": item_col, "--time-col": time_col})
    if len(df) == 0:
        raise DataError("the interactions are empty (0 rows)")
    if min_len < 1:
        raise DataError(f"min_len must be >= 1, got {min_len}")
    _check_ids(df[user_col], user_col)
    _check_ids(df[item_col], item_col)

    user_codes, user_ids = _factorize(df[user_col], user_col)
    item_codes, item_ids = _factorize(df[item_col], item_col)
    if time_col is not None:
        times = _timestamps(df[time_col], time_col)
        order = _user_time_order(user_codes, len(user_ids), times)
        times = times[order]
    else:
        order = np.argsort(user_codes, kind="stable")
        times = None
    user_codes = user_codes[order]
    item_codes = item_codes[order]

    keep = np.ones(len(order), dtype=bool)
    if dedupe_consecutive:
        keep[1:] = ~((item_codes[1:] == item_codes[:-1]) & (user_codes[1:] == user_codes[:-1]))
    if min_len > 1:
        lengths = np.bincount(user_codes[keep], minlength=len(user_ids))
        keep &= (lengths >= min_len)[user_codes]
    if not keep.all():
        user_codes, item_codes = user_codes[keep], item_codes[keep]
        times = None if times is None else times[keep]
    if len(user_codes) == 0:
        raise DataError(f"no user has at least min_len={min_len} interactions")

    # compact both id spaces to what survived the filters (a remap, not a sort: codes are already dense)
    used_users, user_codes = _compact(user_codes, len(user_ids))
    used_items, item_codes = _compact(item_codes, len(item_ids))
    counts = np.bincount(user_codes, minlength=len(used_users))
    offsets = np.zeros(len(used_users) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Sequences(
        users=user_ids[used_users],
        offsets=offsets,
        items=(item_codes + 1).astype(np.int32),
        times=times,
        vocab=ItemVocab(item_ids[used_items]),
    )


# ---------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """Training sequences plus validation and test windows (each window's target is the next item)."""

    train: SequenceSet
    valid: SequenceSet
    test: SequenceSet
    kind: str


def leave_one_out(seqs: Sequences) -> Split:
    """Last item → test, second-to-last → validation, the rest → train; users with < 3 items train only."""
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    evaluated = (ends - starts) >= 3
    if not evaluated.any():
        raise DataError(
            "no user has at least 3 interactions: leave-one-out needs one for training, "
            "one for validation and one for test"
        )
    rows = np.arange(len(seqs))
    train_ends = ends - 2 * evaluated
    train = SequenceSet(seqs.items, starts.copy(), train_ends, rows)
    ev = rows[evaluated]
    valid = SequenceSet(seqs.items, starts[ev], ends[ev] - 2, ev, seqs.items[ends[ev] - 2])
    test = SequenceSet(seqs.items, starts[ev], ends[ev] - 1, ev, seqs.items[ends[ev] - 1])
    return Split(train, valid, test, "leave_one_out")


def time_split(seqs: Sequences, valid_frac: float = 0.1, test_frac: float = 0.1) -> Split:
    """A global temporal split: events before the validation cut-off train; for each user active after a
    cut-off, the history before it is the input and the first event after it the target."""
    if seqs.times is None:
        raise DataError("a time split needs timestamps: pass --time-col (or use the leave-one-out split)")
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise DataError(f"valid_frac and test_frac must be in (0, 1) with a sum < 1, got {valid_frac}, {test_frac}")
    t_valid, t_test = np.quantile(seqs.times, [1 - valid_frac - test_frac, 1 - test_frac], method="lower")
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    rows = np.arange(len(seqs))

    def cut(t) -> np.ndarray:
        # events are time-ordered within a user, so the count before the cut-off is the cut position
        before = np.concatenate([[0], np.cumsum(seqs.times < t)])
        return starts + (before[ends] - before[starts])

    cut_valid, cut_test = cut(t_valid), cut(t_test)
    train = SequenceSet(seqs.items, starts.copy(), cut_valid, rows)
    train = train.take(np.flatnonzero(train.lengths >= 2))

    def window(cut_at: np.ndarray, upto: np.ndarray) -> SequenceSet:
        ok = (cut_at > starts) & (cut_at < upto)
        r = rows[ok]
        return SequenceSet(seqs.items, starts[r], cut_at[r], r, seqs.items[cut_at[r]])

    valid = window(cut_valid, np.minimum(cut_test, ends))
    test = window(cut_test, ends)
    if len(test) == 0:
        raise DataError("the time split left no test user with history before the test cut-off")
    return Split(train, valid, test, "time")


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def read_table(path: str | Path, fmt: str) -> pd.DataFrame:
    """A DataFrame of interactions from a file (or, for ml-100k/synthetic/retail, a directory or nothing)."""
    from sasrec_jax import movielens, retail, synthetic

    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "synthetic":
        return synthetic.generate_sessions().events
    if fmt == "retail":
        return retail.generate_retail()
    if fmt == "ml-100k":
        return movielens.load_ml100k(path)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data file is empty: {path}")
    if fmt == "sasrec":
        return movielens.read_sasrec_txt(path)
    try:
        if fmt == "csv":
            # every field as text first, so that "007" is not read as the number 7 (then merged with "7")
            kw = dict(sep=None, engine="python") if path.suffix in (".tsv", ".txt") else {}
            df = _canonical_ints(pd.read_csv(path, dtype=str, **kw))
        else:
            df = pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DataError(f"cannot read {path} as {fmt}: {first[:300]}; is it a {fmt} file?") from None
    except Exception as e:  # pyarrow raises its own types for a file that is not Parquet at all
        if type(e).__module__.split(".")[0] != "pyarrow":
            raise
        why = f"{type(e).__name__}: {str(e)[:300]}"
        raise DataError(f"cannot read {path} as {fmt}: {why}; is it a {fmt} file?") from None
    if len(df) == 0:
        raise DataError(f"no interactions in {path} (0 rows)")
    return df


def _canonical_ints(df: pd.DataFrame) -> pd.DataFrame:
    """Text columns whose every value is a canonical integer in int64 ("7", "-3"; not "007" or "+7") as int64;
    the others stay text (the id policy of `sasrec_serve.ids`)."""
    out = {}
    for col in df.columns:
        text = df[col]
        ok = text.notna().all() and bool(text.str.fullmatch(id_policy.CANONICAL_INT).all())
        if ok:
            numbers = pd.to_numeric(text, errors="coerce")  # beyond int64: uint64, float or object
            ok = numbers.dtype == np.int64
        out[col] = numbers.astype(np.int64) if ok else text
    return pd.DataFrame(out, index=df.index)
