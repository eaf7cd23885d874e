"""Files written safely, without JAX: atomic writes (temporary beside the destination, fsync, rename), the one
temporary-name pattern of every writer in sasrec-jax, and the removal of temporaries left by killed writers.

Run directories, exports and the MovieLens extraction write through here (the download itself is pooch's,
which also writes to a temporary name and renames)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def temp_prefix(name: str) -> str:
    """The prefix of a temporary beside `name` ("." + name + ".tmp-<host>-<pid>-"): `remove_stale` can tell the
    leftovers of a killed process from the temporaries of one still writing."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _temporary(name: str | None = None) -> re.Pattern:
    """What `temp_prefix(name)` writes (any name for None), with the writer's host and pid as groups."""
    stem = re.escape(name) if name is not None else ".+"
    return re.compile(rf"\.{stem}\.tmp-(?P<host>.+)-(?P<pid>\d+)-")


def is_temporary(name: str) -> bool:
    """A name `temp_prefix` made (a write in progress, or the leftover of a killed one)."""
    return _temporary().match(name) is not None


STALE_AFTER_S = 24 * 3600  # a temporary of another host is stale after this long (its process cannot be asked)


def remove_stale(directory: str | Path, name: str | None = None) -> list[Path]:
    """Removes the temporaries of `name` (None: of any name) in `directory` left by processes that no longer run
    (killed during a write); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    pattern = _temporary(name)
    for p in directory.iterdir():
        m = pattern.match(p.name)
        if m is None or not _stale(p, m["host"], int(m["pid"])):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


def _stale(path: Path, host: str, pid: int) -> bool:
    if host != socket.gethostname():
        try:
            return time.time() - path.lstat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes beside the destination, fsyncs, then renames: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
