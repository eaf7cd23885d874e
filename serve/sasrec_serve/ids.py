"""The id policy: which values are item (and user) ids, and how a queried id finds a catalogue id (numpy only).

One implementation for both sides: training normalizes its id columns with `normalize` (through sasrec_jax.data),
and `ItemVocab` (external id <-> item index) is the one vocabulary of the estimator, its run directories and the
predictor's items.json.

- A column's ids are all integers (int64) or all strings. Floats count as integers when every one is whole (pandas
  widens an integer column with a missing value to float); a fraction, a bool, a complex number, bytes, a list, a
  dict or None is refused, and so is a mix of integers and strings ("5" and 5 would be two different items).
- Integers must fit int64 (the graphs' and Parquet's widest integer).
- A text field (CSV) becomes an integer only in its canonical form (`CANONICAL_INT`): "7" is 7, "007" stays "007".
- Lookups are lenient across the two kinds: in an integer catalogue the string "50" finds 50 (canonical strings
  only), in a string catalogue the integer 50 finds "50".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

PAD = 0  # item index 0 is padding everywhere: in windows, embedding tables, score columns and bundles
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CANONICAL_INT = r"-?(?:0|[1-9][0-9]*)"  # what str(int) writes: no sign "+", no leading zeros, no spaces
_CANONICAL = re.compile(CANONICAL_INT)


class IdError(ValueError):
    """Values that break the id policy; the message names the column, a count and an example. `position` is the
    index of the offending value in a looked-up list, when there is one."""

    position: int | None = None


def _kind(v) -> str:
    """'int', 'float', 'str' or the name of a type that is no id."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    return "None" if v is None else type(v).__name__


def _describe(values: np.ndarray, bad: np.ndarray, what: str, column: str, fix: str) -> IdError:
    rows = np.flatnonzero(bad)
    example = values[int(rows[0])]
    example = example.item() if isinstance(example, np.generic) else example
    return IdError(f"column {column!r} has {len(rows):,} {what} (e.g. {example!r} at row {int(rows[0])}); {fix}")


def normalize(values, column: str) -> np.ndarray:
    """The ids of one column as int64 or as an object array of str; raises IdError naming the column.

    `values` is a numpy array or a sequence; numeric numpy dtypes are checked without a Python loop."""
    arr = values if isinstance(values, np.ndarray) else objects(values)
    if arr.ndim != 1:
        raise IdError(f"column {column!r} must be one-dimensional, got shape {arr.shape}")
    kind = arr.dtype.kind
    if kind == "b":
        raise IdError(f"column {column!r} holds booleans, not ids; map them to integers or strings")
    if kind == "c":
        raise IdError(f"column {column!r} holds complex numbers, not ids")
    if kind == "i":
        return arr.astype(np.int64, copy=False)
    if kind == "u":
        too_big = arr > INT64_MAX
        if too_big.any():
            raise _describe(arr, too_big, "ids above the int64 maximum", column, "store them as strings")
        return arr.astype(np.int64)
    if kind == "f":
        return _whole_floats(arr, column)
    if kind in "US":
        if kind == "S":
            raise IdError(f"column {column!r} holds bytes, not ids; decode them to str")
        return arr.astype(object)
    return _objects(arr, column)


def _whole_floats(arr: np.ndarray, column: str) -> np.ndarray:
    finite = np.isfinite(arr)
    if not finite.all():
        raise _describe(arr, ~finite, "non-finite ids (NaN or infinity)", column, "drop or fill those rows")
    frac = arr != np.round(arr)
    if frac.any():
        raise _describe(
            arr, frac, "ids with a fraction", column, "ids must be integers or strings (e.g. df[col].astype(str))"
        )
    out_of_range = (arr < -(2.0**63)) | (arr >= 2.0**63)
    if out_of_range.any():
        raise _describe(arr, out_of_range, "ids outside int64", column, "store them as strings")
    return arr.astype(np.int64)


def _objects(arr: np.ndarray, column: str) -> np.ndarray:
    kinds = np.array([_kind(v) for v in arr], dtype=object)
    present = set(kinds.tolist())
    for wrong in sorted(present - {"int", "float", "str"}):
        what = "missing ids (None)" if wrong == "None" else f"values of type {wrong}, which are no ids"
        fix = "drop or fill those rows" if wrong == "None" else "ids must be integers or strings"
        raise _describe(arr, kinds == wrong, what, column, fix)
    if "str" in present and present != {"str"}:
        minority = "str" if (kinds == "str").sum() <= (kinds != "str").sum() else "num"
        bad = (kinds == "str") if minority == "str" else (kinds != "str")
        what = "string ids among integer ids" if minority == "str" else "numeric ids among string ids"
        raise _describe(
            arr, bad, what, column, f"make them one type, e.g. df[{column!r}].astype(str) ('5' and 5 are not one item)"
        )
    if present == {"str"}:
        return arr.astype(object)
    if "float" in present:
        floats = kinds == "float"
        vals = np.array([v if k == "float" else 0.0 for v, k in zip(arr, kinds)], dtype=np.float64)
        bad = floats & ~np.isfinite(vals)
        if bad.any():
            raise _describe(arr, bad, "non-finite ids (NaN or infinity)", column, "drop or fill those rows")
        bad = floats & (vals != np.round(vals))
        if bad.any():
            raise _describe(arr, bad, "ids with a fraction", column, "ids must be integers or strings")
    ints = [int(v) for v in arr]
    big = np.array([not INT64_MIN <= v <= INT64_MAX for v in ints], dtype=bool)
    if big.any():
        raise _describe(arr, big, "ids outside int64", column, "store them as strings")
    return np.asarray(ints, dtype=np.int64)


def objects(values) -> np.ndarray:
    """A 1-d object array of the values as given (nested lists stay elements, not a second dimension)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise IdError(f"expected a list of ids, got {type(values).__name__}")
    values = list(values)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):  # one by one: a slice assignment would unpack equal-length lists
        out[i] = v
    return out


def unique(ids: np.ndarray, column: str) -> None:
    """Refuses duplicate ids (a catalogue lists each item once)."""
    _, first, counts = np.unique(ids.astype(str) if ids.dtype == object else ids, return_index=True,
                                 return_counts=True)  # fmt: skip
    dup = counts > 1
    if dup.any():
        example = ids[int(first[np.flatnonzero(dup)[0]])]
        example = example.item() if isinstance(example, np.generic) else example
        raise IdError(
            f"{column} lists {int(dup.sum()):,} ids more than once (e.g. {example!r}); each id must be unique"
        )


def catalogue(ids, column: str) -> tuple[np.ndarray, bool]:
    """A catalogue's ids (a JSON list from items.json or config.json, or an array): checked by the policy, no
    duplicates, not empty. Returns the ids (int64 or object str) and whether they are integers."""
    if not isinstance(ids, (list, np.ndarray)) or not len(ids):
        raise IdError(f"{column} must be a non-empty list of ids")
    arr = normalize(ids if isinstance(ids, np.ndarray) else objects(ids), column)
    unique(arr, column)
    return arr, arr.dtype != object


def lookup_key(v, is_int: bool):
    """The catalogue key a queried id means, or None when it cannot be in the catalogue.

    Raises IdError for values that are no id at all (None, NaN, bool, containers, fractions of no use)."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise IdError(f"item ids must be int or str, got {type(v).__name__} {v!r}")
    if isinstance(v, float):
        if math.isnan(v):
            raise IdError("item ids must not be NaN")
        if not v.is_integer():
            return None  # 2.5 is no integer id, and a string catalogue never holds "2.5" as a float
        v = int(v)
    if isinstance(v, int):
        if is_int:
            return v if INT64_MIN <= v <= INT64_MAX else None
        return str(v)
    if is_int:  # a string queried in an integer catalogue: only its canonical form is that integer
        return int(v) if _CANONICAL.fullmatch(v) else None
    return v


def py(v):
    """A numpy scalar as the plain Python value JSON and users expect."""
    return v.item() if isinstance(v, np.generic) else v


class ItemVocab:
    """External item ids in index order: `ids[i - 1]` is the id of item index i (index 0 is PAD).

    The one vocabulary of training (built from the interactions), run directories (config.json "items") and
    bundles (items.json): construction checks the ids by the policy (one kind, no duplicates, not empty), and a
    queried id is brought to the catalogue's kind by `lookup_key` ("50" finds 50, 50 finds "50")."""

    def __init__(self, ids, where: str = "the item list"):
        self.ids, self.is_int = catalogue(ids, where)  # int64 or object array of str
        self._index: dict | None = None  # id -> index, built on the first lookup

    @property
    def size(self) -> int:
        """V, the number of real items (scores have V + 1 columns)."""
        return len(self.ids)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ItemVocab({self.size:,} {'integer' if self.is_int else 'string'} ids)"

    def key(self, v):
        """The catalogue key a queried id means, or None when it cannot be in this catalogue (IdError for
        values that are no id at all)."""
        return lookup_key(v, self.is_int)

    def indices(self, values) -> np.ndarray:
        """Item indices (int32) of queried ids, PAD for unknown ones; IdError (with `position`) for a value
        that is no id."""
        if self._index is None:
            self._index = {v: i + 1 for i, v in enumerate(self.ids.tolist())}
        values = objects(values)
        out = np.zeros(len(values), np.int32)
        for j, v in enumerate(values):
            try:
                out[j] = self._index.get(self.key(v), PAD)
            except IdError as e:
                e.position = j
                raise
        return out

    def split(self, values) -> tuple[list[int], list]:
        """The indices of the known ids in order, and the unknown ids as given."""
        idx = self.indices(values)
        unknown = [py(v) for v, i in zip(values, idx) if i == PAD]
        return idx[idx != PAD].tolist(), unknown

    def decode(self, indices) -> list:
        """External ids (Python ints or strs) of item indices 1..V."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 1 or idx.max() > self.size):
            raise IdError(f"item index out of range 1..{self.size}: {idx[(idx < 1) | (idx > self.size)][:5]}")
        return [py(v) for v in self.ids[idx - 1]]

    def to_json(self) -> list:
        return [py(v) for v in self.ids]


def windows(
    sessions: Sequence, max_len: int, split: Callable[[int, object], tuple[list[int], list]]
) -> tuple[np.ndarray, list[list[int]], list[list]]:
    """The model's input: left-padded [N, max_len] windows of each session's most recent known item indices, with
    every known index of each session in order (also those older than the window) and its unknown ids as given.
    `split(r, items)` turns session r into (known indices, unknown ids), so each caller keeps its own checks and
    error naming; the estimator, export's reference scores and the predictor all build windows here."""
    seq_NxL = np.full((len(sessions), max_len), PAD, np.int32)
    known, unknown = [], []
    for r, items in enumerate(sessions):
        idx, unk = split(r, items)
        recent = idx[-max_len:]
        if recent:
            seq_NxL[r, max_len - len(recent) :] = recent
        known.append(idx)
        unknown.append(unk)
    return seq_NxL, known, unknown
