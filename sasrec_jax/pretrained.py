"""Pre-trained item vectors: read them from files or Python objects and copy them into the item table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from sasrec_jax.data import ItemVocab
from sasrec_jax.errors import DataError


def read_item_vectors(source) -> tuple[list, np.ndarray]:
    """(ids, float32 [n, d]) from a dict {id: vector}, a DataFrame (`item_id`, `embedding`), an (ids, matrix)
    pair, or a path: `.parquet` (`item_id`, `embedding`), `.npz` (`ids`, `embeddings`), or `.npy` with the
    ids beside it in `<stem>.ids.json` / `<stem>.ids.txt` (one per line)."""
    rows: list | np.ndarray  # vectors as given; one float32 matrix below
    if isinstance(source, dict):
        ids, rows = list(source), list(source.values())
    elif isinstance(source, pd.DataFrame):
        ids, rows = _from_frame(source, "DataFrame")
    elif isinstance(source, tuple) and len(source) == 2:
        ids, rows = list(source[0]), source[1]
    elif isinstance(source, (str, Path)):
        ids, rows = _from_path(Path(source))
    else:
        raise DataError(f"cannot read item vectors from a {type(source).__name__}")
    try:
        matrix = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError("item vectors must all have the same length") from None
    if matrix.ndim != 2 or len(matrix) != len(ids):
        raise DataError(f"expected one vector per id: {len(ids)} ids, vectors of shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise DataError("item vectors contain NaN or infinite values")
    return ids, matrix


def _from_frame(df: pd.DataFrame, where: str) -> tuple[list, list]:
    missing = {"item_id", "embedding"} - set(df.columns)
    if missing:
        raise DataError(f"{where} needs columns item_id and embedding; missing {sorted(missing)}")
    return df["item_id"].tolist(), [np.asarray(v, dtype=np.float32) for v in df["embedding"]]


def _from_path(path: Path) -> tuple[list, np.ndarray | list]:
    if not path.is_file():
        raise DataError(f"item vector file not found: {path}")
    try:
        if path.suffix == ".parquet":
            return _from_frame(pd.read_parquet(path), str(path))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "ids" not in z or "embeddings" not in z:
                    raise DataError(f"{path} must hold arrays 'ids' and 'embeddings', has {list(z.keys())}")
                return z["ids"].tolist(), z["embeddings"]
        if path.suffix == ".npy":
            matrix = np.load(path, allow_pickle=False)
            for sidecar in (path.with_suffix(".ids.json"), path.with_suffix(".ids.txt")):
                if sidecar.is_file():
                    text = sidecar.read_text()
                    ids = json.loads(text) if sidecar.suffix == ".json" else text.split()
                    return ids, matrix
            raise DataError(f"{path} needs its ids beside it in {path.stem}.ids.json or {path.stem}.ids.txt")
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read item vectors from {path}: {e}") from None
    raise DataError(f"unsupported item vector file {path.name}: use .parquet, .npz or .npy (+ ids)")


def copy_into_table(table_VxD: np.ndarray, vocab: ItemVocab, ids: list, matrix: np.ndarray) -> tuple[np.ndarray, dict]:
    """A copy of the table with rows of known items replaced; returns it with counts for the log."""
    if matrix.shape[1] != table_VxD.shape[1]:
        raise DataError(
            f"pre-trained item vectors have dimension {matrix.shape[1]}, the model has dim={table_VxD.shape[1]}: "
            f"pass dim={matrix.shape[1]} or vectors of width {table_VxD.shape[1]}"
        )
    idx = vocab.indices(ids)
    known = idx > 0
    table = np.array(table_VxD, dtype=np.float32, copy=True)
    table[idx[known]] = matrix[known]
    counts = {
        "initialised": int(len(np.unique(idx[known]))),
        "random": int(vocab.size - len(np.unique(idx[known]))),
        "unknown_ids_ignored": int((~known).sum()),
    }
    return table, counts


def initialiser(source, dim: int, vocab: ItemVocab, log: Callable[[str], None]) -> Callable[[dict], dict]:
    """What `fit(init_item_embeddings=source)` hands training: a function from freshly initialised params to params
    whose item table holds the pre-trained vectors (read and checked now, before any training)."""
    ids, matrix = read_item_vectors(source)
    if matrix.shape[1] != dim:
        raise DataError(
            f"pre-trained item vectors have dimension {matrix.shape[1]}, the model has dim={dim}: "
            f"pass dim={matrix.shape[1]} or vectors of width {dim}"
        )

    def apply(params: dict) -> dict:
        table, counts = copy_into_table(params["item_embed"]["embedding"], vocab, ids, matrix)
        log(
            f"item embeddings: {counts['initialised']:,} from pre-trained vectors, {counts['random']:,} "
            f"initialised randomly, {counts['unknown_ids_ignored']:,} vectors of unknown items ignored"
        )
        return {**params, "item_embed": {"embedding": table}}

    return apply
