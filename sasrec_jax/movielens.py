"""MovieLens loaders: ML-100K (local or downloaded to a cache) and ML-1M in SASRec's text format."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from sasrec_jax.errors import DataError

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# GroupLens publishes MD5 checksums only; we also record the sha256 of what we downloaded.
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"

_ML100K = "ml-100k"
_CHUNK = 1 << 16
_TIMEOUT_S = 60
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
    cache.mkdir(parents=True, exist_ok=True)
    zip_path = cache / f"{_ML100K}.zip"
    sha256 = _fetch(url, zip_path, md5, progress)
    _write_atomic(cache / f"{_ML100K}.zip.sha256", f"{sha256}  {zip_path.name}\n")
    return _extract(zip_path, cache / _ML100K)


def _fetch(url: str, dest: Path, md5: str | None, progress: bool) -> str:
    """Download `url` to `dest` via a temp file, check its MD5, and return its sha256."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got_md5, sha256 = _stream(url, out, progress)
        if md5 is not None and got_md5 != md5.lower():
            raise DataError(f"MD5 mismatch for {url}: expected {md5.lower()}, got {got_md5}; file deleted")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256


def _stream(url: str, out: IO[bytes], progress: bool) -> tuple[str, str]:
    """Copy the body of `url` into `out`; returns (md5, sha256) hex digests."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with _progress_bar(progress, total, url) as update:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    md5.update(chunk)
                    sha256.update(chunk)
                    update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        # HTTPError's str() carries the status code; URLError's reason is the underlying socket error.
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise DataError(
            f"could not download {url}: {reason}. Download it by hand and set SASREC_DATA_DIR "
            "to the folder containing ml-100k/u.data (or pass data_dir)"
        ) from exc
    return md5.hexdigest(), sha256.hexdigest()


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None, url: str) -> Iterator[Callable[[int], object]]:
    """Yield an `update(n_bytes)` callable: a tqdm bar when wanted and installed, else a no-op."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda n: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
        yield bar.update


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _extract(zip_path: Path, target: Path) -> Path:
    """Extract into a temp dir next to `target`, then rename it into place in one step."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.extract-"))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{zip_path} is not a valid zip file: {exc}") from exc
        found = [p.parent for p in tmp.rglob("u.data")]
        if not found:
            raise DataError(f"{zip_path} does not contain u.data")
        try:
            os.replace(found[0], target)
        except OSError:
            # Another process may have finished the same extraction first; its copy is as good as ours.
            if not _has_ml100k(target):
                raise DataError(f"cannot create {target}: it exists without u.data; delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_ml100k(data_dir: str | os.PathLike[str] | None = None, **kw: object) -> pd.DataFrame:
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


def load_ml100k_items(data_dir: str | os.PathLike[str] | None = None, **kw: object) -> pd.DataFrame:
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


def load_ml1m_txt(data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """ML-1M as preprocessed for SASRec (`ml-1m.txt[.gz]`) from `data_dir` or `$SASREC_DATA_DIR`."""
    root = data_dir if data_dir is not None else os.environ.get("SASREC_DATA_DIR")
    if not root:
        raise DataError("ML-1M not found: set SASREC_DATA_DIR to the folder containing ml-1m/ml-1m.txt.gz")
    base = Path(root).expanduser()
    for folder in (base / "ml-1m", base):
        for name in ("ml-1m.txt.gz", "ml-1m.txt"):
            if (folder / name).is_file():
                return read_sasrec_txt(folder / name)
    raise DataError(
        f"no ml-1m.txt.gz or ml-1m.txt in {base / 'ml-1m'} or {base}: set SASREC_DATA_DIR to the folder "
        "containing ml-1m/ml-1m.txt.gz"
    )
