"""MovieLens loaders: ML-100K (local, or downloaded into a cache with pooch) and SASRec's `user item` text format
(ML-1M as the SASRec authors preprocessed it)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from sasrec_jax import files
from sasrec_jax.errors import DataError

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# GroupLens publishes MD5 checksums only.
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"

_ML100K = "ml-100k"
_ITEM_FIELDS = ["item_id", "title", "release_date", "video_release_date", "imdb_url"]


def default_cache_dir() -> Path:
    """`$SASREC_CACHE_DIR`, else `~/.cache/sasrec-jax`."""
    env = os.environ.get("SASREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sasrec-jax"


def _has_ml100k(folder: Path) -> bool:
    return (folder / "u.data").is_file()


def ml100k_dir(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str = ML100K_URL,
    md5: str | None = ML100K_MD5,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """Folder holding ML-100K's `u.data`: explicit dir, `$SASREC_DATA_DIR/ml-100k`, cache, else download."""
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        for folder in (base, base / _ML100K):
            if _has_ml100k(folder):
                return folder
        raise DataError(f"no ML-100K u.data in {base} or {base / _ML100K}")

    env = os.environ.get("SASREC_DATA_DIR")
    if env and _has_ml100k(Path(env).expanduser() / _ML100K):
        return Path(env).expanduser() / _ML100K

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / _ML100K
    if _has_ml100k(target):
        return target
    if not download:
        raise DataError(
            "ML-100K not found and download=False. Either pass data_dir (a folder holding u.data), "
            f"or set SASREC_DATA_DIR to a folder containing ml-100k/u.data, or allow the download of "
            f"{url} into {cache}"
        )
    return _download_ml100k(cache, url, md5, progress)


def _download_ml100k(cache: Path, url: str, md5: str | None, progress: bool) -> Path:
    # Imported here: only a download needs them, and reading local files should not pay for requests.
    import pooch
    import requests

    try:
        # pooch streams into a temporary file, checks the hash and only then renames it to ml-100k.zip; a zip
        # already in the cache with the right hash is used without any network access.
        zip_path = pooch.retrieve(
            url,
            known_hash=f"md5:{md5}" if md5 else None,
            fname=f"{_ML100K}.zip",
            path=cache,
            progressbar=progress and importlib.util.find_spec("tqdm") is not None,
        )
    except requests.exceptions.RequestException as exc:
        raise DataError(
            f"could not download {url}: {_reason(exc)}. Download it by hand and set SASREC_DATA_DIR to the folder "
            "containing ml-100k/u.data (or pass data_dir)"
        ) from exc
    except ValueError as exc:  # pooch's checksum mismatch (the download is already deleted) or an unusable URL
        raise DataError(
            f"could not download {url}: {exc} Retry, or download it by hand and set SASREC_DATA_DIR to the folder "
            "containing ml-100k/u.data (or pass data_dir)"
        ) from exc
    except OSError as exc:
        raise DataError(
            f"cannot write the download cache {cache}: {exc}. Set SASREC_CACHE_DIR to a writable folder, or "
            "SASREC_DATA_DIR to a folder containing ml-100k/u.data"
        ) from exc
    return _extract(Path(zip_path), cache / _ML100K)


def _reason(exc: BaseException) -> str:
    """The HTTP status, else the socket error at the bottom of requests' exception chain (refused, timed out...)."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return str(exc)


def _extract(zip_path: Path, target: Path) -> Path:
    """Extract into a temp dir next to `target`, then rename it into place in one step: `u.data` in `target` is the
    cache-hit test, so `target` must never exist half-extracted (pooch's Unzip writes in place)."""
    files.remove_stale(target.parent, target.name)  # extractions of killed processes
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=files.temp_prefix(target.name)))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            # Only possible without a checksum (md5=None). Deleted, or pooch would hand back the same file next time.
            zip_path.unlink(missing_ok=True)
            raise DataError(
                f"{zip_path} is not a valid zip file ({exc}) and was deleted: check the URL, or pass the md5 of the "
                "expected file so a bad download is caught"
            ) from exc
        found = [p.parent for p in tmp.rglob("u.data")]
        if not found:
            zip_path.unlink(missing_ok=True)
            raise DataError(f"{zip_path} does not contain u.data and was deleted: check the URL")
        try:
            os.replace(found[0], target)
        except OSError:
            # Another process may have finished the same extraction first; its copy is as good as ours.
            if not _has_ml100k(target):
                raise DataError(f"cannot create {target}: it exists without u.data; delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_ml100k(data_dir: str | os.PathLike[str] | None = None, **kw: Any) -> pd.DataFrame:
    """ML-100K ratings as `user_id, item_id, rating, timestamp` (int64); `kw` goes to `ml100k_dir`."""
    path = ml100k_dir(data_dir, **kw) / "u.data"
    names = ["user_id", "item_id", "rating", "timestamp"]
    try:
        return pd.read_csv(path, sep="\t", header=None, names=names, dtype=np.int64)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path} is not tab-separated integer user/item/rating/timestamp rows: {exc}") from exc


def _genre_names(path: Path) -> list[str]:
    """Genre names ordered by index, from `u.genre` (`name|index` lines; trailing blank lines)."""
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            name, _, index = line.rpartition("|")
            if not index.strip().isdigit():
                raise DataError(f"{path}: bad genre line {line!r} (expected name|index)")
            pairs.append((int(index), name))
    return [name for _, name in sorted(pairs)]


def load_ml100k_items(data_dir: str | os.PathLike[str] | None = None, **kw: Any) -> pd.DataFrame:
    """ML-100K movies as `item_id, title, genres` ('|'-joined genre names); `kw` goes to `ml100k_dir`."""
    folder = ml100k_dir(data_dir, **kw)
    genres = _genre_names(folder / "u.genre")
    path = folder / "u.item"
    # u.item predates UTF-8 at GroupLens: titles such as "Misérables" are latin-1 encoded.
    raw = pd.read_csv(
        path,
        sep="|",
        header=None,
        encoding="latin-1",
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
    )
    if raw.shape[1] != len(_ITEM_FIELDS) + len(genres):
        raise DataError(
            f"{path} has {raw.shape[1]} columns, expected {len(_ITEM_FIELDS)} fields + {len(genres)} genres"
        )
    try:
        flags = raw.iloc[:, len(_ITEM_FIELDS) :].astype(np.int64).to_numpy() == 1
        item_id = raw.iloc[:, 0].astype(np.int64).to_numpy()
    except ValueError as exc:
        raise DataError(f"{path}: non-integer item id or genre flag: {exc}") from exc
    names = np.array(genres, dtype=object)
    return pd.DataFrame(
        {
            "item_id": item_id,
            "title": raw.iloc[:, 1].to_numpy(),
            "genres": ["|".join(names[row]) for row in flags],
        }
    )


def _is_gzip(path: Path) -> bool:
    """Detect gzip by its magic bytes, so a misnamed file still reads."""
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt") if _is_gzip(path) else path.open("r")


def _first_bad_line(path: Path) -> int | None:
    """1-based number of the first non-blank line that is not two integers (slow; errors only)."""
    with _open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not all(p.lstrip("+-").isdigit() for p in parts):
                return number
    return None


def read_sasrec_txt(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read SASRec's `user item` lines (optionally gzipped): `user_id, item_id, timestamp` (row number)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    compression = "gzip" if _is_gzip(path) else None
    try:
        # sep=r"\s+" takes pandas' fast C whitespace tokenizer.
        df = pd.read_csv(path, sep=r"\s+", header=None, dtype=np.int64, compression=compression)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be read (corrupt gzip?): {exc}") from exc
    except UnicodeDecodeError:
        raise DataError(
            f"{path} is not a text file of 'user item' lines (it does not decode as UTF-8); pass --format csv or "
            "parquet for other files"
        ) from None
    except (ValueError, pd.errors.ParserError) as exc:
        try:
            bad = _first_bad_line(path)
        except UnicodeDecodeError:
            bad = None
        where = f"line {bad}: " if bad is not None else ""
        why = " ".join(str(exc).split())
        raise DataError(f"{path}: {where}expected two integers 'user item' per line ({why})") from exc
    if df.shape[1] != 2:
        raise DataError(
            f"{path}: line {_first_bad_line(path)}: expected two integers 'user item' per line, "
            f"got {df.shape[1]} columns"
        )
    df.columns = ["user_id", "item_id"]
    df["timestamp"] = np.arange(len(df), dtype=np.int64)
    return df
