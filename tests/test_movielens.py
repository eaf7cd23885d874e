"""Tests for the MovieLens loaders: the pooch download against a loopback HTTP server, text parsing, real data."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sasrec_jax.errors import DataError
from sasrec_jax.movielens import (
    load_ml100k,
    load_ml100k_items,
    ml100k_dir,
    read_sasrec_txt,
)

# Captured at import: the autouse fixture below removes SASREC_DATA_DIR from the environment.
REAL_DIR = os.environ.get("SASREC_DATA_DIR", "")
REAL_DATA = pytest.mark.skipif(not REAL_DIR, reason="SASREC_DATA_DIR not set: real MovieLens data unavailable")

U_DATA = "1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t891717742\n"
U_GENRE = "unknown|0\nAction|1\nComedy|2\n\n"
U_ITEM = (
    "10|Star Wars (1977)|01-Jan-1977||http://example.invalid/sw|0|1|0\n"
    "20|Misérables, Les (1995)|01-Jan-1995||http://example.invalid/les|0|0|1\n"
    "30|Nothing (1990)|01-Jan-1990||http://example.invalid/n|1|1|1\n"
)


def _make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", U_DATA)
        zf.writestr("ml-100k/u.genre", U_GENRE)
        zf.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
    return buf.getvalue()


ZIP = _make_zip()
ZIP_MD5 = hashlib.md5(ZIP).hexdigest()
NOT_A_ZIP = b"<html>a captive portal, not a zip</html>"
NOT_A_ZIP_MD5 = hashlib.md5(NOT_A_ZIP).hexdigest()
FILES = {"/ml-100k.zip": ZIP, "/corrupt.zip": NOT_A_ZIP}


class _Server:
    """Loopback HTTP server: serves FILES, 404 elsewhere, and records the requested paths."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = FILES.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The real data (via SASREC_DATA_DIR) or a user cache must never satisfy the download tests.
    monkeypatch.delenv("SASREC_DATA_DIR", raising=False)
    monkeypatch.setenv("SASREC_CACHE_DIR", str(tmp_path / "default-cache"))
    # requests (under pooch) would send even loopback requests to a proxy configured in the environment
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")


def _one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_download_verify_extract_and_reuse(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "url": f"{server.base}/ml-100k.zip", "md5": ZIP_MD5}
    ratings = load_ml100k(**kw)
    assert ratings.values.tolist() == [[1, 10, 5, 881250949], [1, 20, 3, 881250950], [2, 10, 4, 891717742]]
    assert server.requests == ["/ml-100k.zip"]
    assert (cache / "ml-100k.zip").read_bytes() == ZIP
    assert (cache / "ml-100k" / "u.data").is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k", "ml-100k.zip"]

    items = load_ml100k_items(**kw)
    assert len(server.requests) == 1
    assert items.to_dict("list") == {
        "item_id": [10, 20, 30],
        "title": ["Star Wars (1977)", "Misérables, Les (1995)", "Nothing (1990)"],
        "genres": ["Action", "Comedy", "unknown|Action|Comedy"],
    }
    assert ml100k_dir(cache_dir=cache, download=False) == cache / "ml-100k"


def test_cache_hits_need_no_network(server: _Server, tmp_path: Path) -> None:
    url = f"{server.base}/ml-100k.zip"
    assert ml100k_dir(cache_dir=tmp_path, url=url, md5=ZIP_MD5, progress=False) == tmp_path / "ml-100k"
    server.close()
    # the extracted folder answers without pooch being asked
    assert ml100k_dir(cache_dir=tmp_path, url=url, md5=ZIP_MD5, progress=False) == tmp_path / "ml-100k"
    # without it, pooch finds the zip in the cache, re-checks its MD5 and it is extracted again, still offline
    shutil.rmtree(tmp_path / "ml-100k")
    assert len(load_ml100k(cache_dir=tmp_path, url=url, md5=ZIP_MD5, progress=False)) == 3
    assert server.requests == ["/ml-100k.zip"]


def test_a_damaged_cached_zip_is_downloaded_again(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "ml-100k.zip").write_bytes(ZIP[:-10])
    assert len(load_ml100k(cache_dir=tmp_path, url=f"{server.base}/ml-100k.zip", md5=ZIP_MD5, progress=False)) == 3
    assert server.requests == ["/ml-100k.zip"]
    assert (tmp_path / "ml-100k.zip").read_bytes() == ZIP


def test_leftovers_of_a_killed_extraction_are_removed(server: _Server, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".ml-100k.tmp-{socket.gethostname()}-{int(dead.stdout)}-x"
    (leftover / "ml-100k").mkdir(parents=True)
    assert ml100k_dir(cache_dir=tmp_path, url=f"{server.base}/ml-100k.zip", md5=ZIP_MD5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", "ml-100k.zip"]


def test_download_with_progress_bar(server: _Server, tmp_path: Path) -> None:
    folder = ml100k_dir(cache_dir=tmp_path, url=f"{server.base}/ml-100k.zip", md5=ZIP_MD5, progress=True)
    assert folder == tmp_path / "ml-100k"


def test_md5_mismatch_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        ml100k_dir(cache_dir=cache, url=f"{server.base}/ml-100k.zip", md5="0" * 32, progress=False)
    message = _one_line_error(excinfo)
    assert f"expected md5:{'0' * 32} but got {ZIP_MD5}" in message
    assert "SASREC_DATA_DIR" in message
    assert list(cache.iterdir()) == []


def test_corrupt_zip_is_caught_by_its_checksum(server: _Server, tmp_path: Path) -> None:
    # what GroupLens' real MD5 does for a truncated or substituted download (here: a page served in its place)
    with pytest.raises(DataError, match=f"expected md5:{ZIP_MD5} but got {NOT_A_ZIP_MD5}") as excinfo:
        ml100k_dir(cache_dir=tmp_path, url=f"{server.base}/corrupt.zip", md5=ZIP_MD5, progress=False)
    _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_zip_without_checksum(server: _Server, tmp_path: Path) -> None:
    url = f"{server.base}/corrupt.zip"
    with pytest.raises(DataError, match=r"ml-100k\.zip is not a valid zip file .* was deleted") as excinfo:
        ml100k_dir(cache_dir=tmp_path, url=url, md5=None, progress=False)
    _one_line_error(excinfo)
    # nothing half-made is left to be taken for a cache hit, so the next call downloads again
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="not a valid zip file"):
        ml100k_dir(cache_dir=tmp_path, url=url, md5=None, progress=False)
    assert server.requests == ["/corrupt.zip", "/corrupt.zip"]


def test_http_404(server: _Server, tmp_path: Path) -> None:
    url = f"{server.base}/missing.zip"
    with pytest.raises(DataError, match=r"could not download .*missing\.zip: HTTP 404 .*SASREC_DATA_DIR") as excinfo:
        ml100k_dir(cache_dir=tmp_path, url=url, md5=ZIP_MD5, progress=False)
    _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-100k.zip"
    with pytest.raises(DataError, match=f"could not download {url}: .*Connection refused.*SASREC_DATA_DIR") as excinfo:
        ml100k_dir(cache_dir=tmp_path, url=url, progress=False)
    _one_line_error(excinfo)


def test_cache_that_cannot_be_written(server: _Server, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(DataError, match=r"cannot write the download cache .*SASREC_CACHE_DIR") as excinfo:
        ml100k_dir(cache_dir=not_a_dir, url=f"{server.base}/ml-100k.zip", md5=ZIP_MD5, progress=False)
    _one_line_error(excinfo)
    assert server.requests == []


def test_no_download_explains_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)data_dir.*SASREC_DATA_DIR.*download"):
        ml100k_dir(cache_dir=tmp_path, download=False)


def test_explicit_and_env_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text(U_DATA)
    assert ml100k_dir(folder, download=False) == folder
    assert ml100k_dir(tmp_path, download=False) == folder
    with pytest.raises(DataError, match="no ML-100K u.data"):
        ml100k_dir(tmp_path / "nowhere")
    monkeypatch.setenv("SASREC_DATA_DIR", str(tmp_path))
    assert ml100k_dir(download=False) == folder
    assert len(load_ml100k(download=False)) == 3


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["seq.txt", "seq.txt.gz"])
def test_read_sasrec_txt(tmp_path: Path, name: str) -> None:
    df = read_sasrec_txt(_write(tmp_path / name, "1 5\n1 3\n2\t7\n  2  5\n"))
    assert list(df.columns) == ["user_id", "item_id", "timestamp"]
    assert all(str(t) == "int64" for t in df.dtypes)
    assert df.values.tolist() == [[1, 5, 0], [1, 3, 1], [2, 7, 2], [2, 5, 3]]


@pytest.mark.parametrize("name", ["seq.txt", "seq.txt.gz"])
@pytest.mark.parametrize(
    ("text", "line"),
    [("1 5\n1 3\n2 x\n", 3), ("1 5\n1 3 4\n", 2), ("1 5\n2\n", 2), ("1\n2\n", 1), ("1 2 3\n4 5 6\n", 1)],
)
def test_read_sasrec_txt_bad_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=f"{name}: line {line}:"):
        read_sasrec_txt(path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.txt.gz"])
def test_read_sasrec_txt_empty(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="is empty"):
        read_sasrec_txt(_write(tmp_path / name, ""))


def test_read_sasrec_txt_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_sasrec_txt(tmp_path / "nope.txt")


@REAL_DATA
def test_real_ml100k() -> None:
    ratings = load_ml100k(REAL_DIR, download=False)
    assert len(ratings) == 100_000
    assert ratings["user_id"].nunique() == 943
    assert ratings["item_id"].nunique() == 1_682
    assert ratings["rating"].between(1, 5).all()


@REAL_DATA
def test_real_ml100k_items() -> None:
    items = load_ml100k_items(REAL_DIR, download=False)
    assert len(items) == 1_682
    titles = set(items["title"])
    assert "Star Wars (1977)" in titles
    assert "Misérables, Les (1995)" in titles
    star_wars = items.loc[items["title"] == "Star Wars (1977)", "genres"].item()
    assert star_wars == "Action|Adventure|Romance|Sci-Fi|War"


@REAL_DATA
def test_real_ml1m_txt() -> None:
    seq = read_sasrec_txt(Path(REAL_DIR) / "ml-1m" / "ml-1m.txt.gz")
    assert len(seq) == 999_611
    assert seq["user_id"].nunique() == 6_040
    assert seq["item_id"].nunique() == 3_416
    assert seq["timestamp"].is_monotonic_increasing
