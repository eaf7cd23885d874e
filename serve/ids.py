"""The id policy: which values are item (and user) ids, and how a queried id finds a catalogue id (numpy only).

One implementation for both sides: training builds its vocabulary with `normalize` (through sasrec_jax.data),
the predictor checks a bundle's items.json with it, and both look queried ids up with `lookup_key`.

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
from collections.abc import Sequence

import numpy as np

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CANONICAL_INT = r"-?(?:0|[1-9][0-9]*)"  # what str(int) writes: no sign "+", no leading zeros, no spaces
_CANONICAL = re.compile(CANONICAL_INT)


class IdError(ValueError):
    """Values that break the id policy; the message names the column, a count and an example."""


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


def _describe(values: Sequence, bad: np.ndarray, what: str, column: str, fix: str) -> IdError:
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


def catalogue(ids: list, column: str) -> tuple[np.ndarray, bool]:
    """A catalogue's ids as saved in JSON (items.json, config.json): checked by the policy, no duplicates, not
    empty. Returns the ids (int64 or object str) and whether they are integers."""
    if not isinstance(ids, list) or not ids:
        raise IdError(f"{column} must be a non-empty list of ids")
    arr = normalize(objects(ids), column)
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
