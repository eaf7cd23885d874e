"""Run directories: config.json plus msgpack checkpoints, written atomically and read without running code.

Layout of a run directory:
  config.json              format version, model/train config, item vocabulary, data description
  checkpoint/last.msgpack  params + optimizer state + loop state (what `--resume` continues from, also from inside
                           an epoch: saved every `checkpoint_minutes` and before every validation)
  checkpoint/best.msgpack  params of the best validation epoch (what evaluation and export load)
  metrics.json, history.csv
msgpack holds only arrays, numbers and strings: unlike pickle, loading a checkpoint never executes code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from sasrec_jax.errors import CheckpointError

FORMAT_VERSION = 1
CONFIG = "config.json"
LAST = "checkpoint/last.msgpack"
BEST = "checkpoint/best.msgpack"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes beside the destination, fsyncs, then renames: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def never_saved(run_dir: str | Path) -> bool:
    """True for a run directory holding only its config.json (and an empty checkpoint/): a run stopped before its
    first checkpoint, which can be started again in place without losing anything."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        return False
    ckpt = run_dir / Path(LAST).parent
    others = [p for p in run_dir.iterdir() if p.name not in (CONFIG, ckpt.name)]
    return not others and (not ckpt.exists() or (ckpt.is_dir() and not any(ckpt.iterdir())))


def read_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a sasrec-jax run directory (no {CONFIG})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    version = cfg.get("format_version") if isinstance(cfg, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this sasrec-jax reads version {FORMAT_VERSION}")
    return cfg


def save(path: str | Path, params: Any, opt_state: Any = None, meta: dict | None = None) -> None:
    """Saves params (a pure dict of arrays), optional optimizer state and JSON-able loop state."""
    payload = {
        "format_version": FORMAT_VERSION,
        "params": jax.device_get(params),
        "opt_state": serialization.to_state_dict(jax.device_get(opt_state)) if opt_state is not None else {},
        "meta": json.dumps(meta or {}, default=_json_default),
    }
    atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load(path: str | Path, params_target: Any, opt_target: Any = None) -> tuple[Any, Any, dict]:
    """Restores into the given targets, checking every array's shape against them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a sasrec-jax checkpoint of format version {FORMAT_VERSION}")
    params = _restore_checked(params_target, payload["params"], path, "params")
    opt_state = None
    if opt_target is not None:
        if not payload["opt_state"]:
            raise CheckpointError(f"{path} holds no optimizer state to resume from")
        opt_state = serialization.from_state_dict(opt_target, payload["opt_state"])
        _check_shapes(serialization.to_state_dict(opt_target), payload["opt_state"], path, "opt_state")
    return params, opt_state, json.loads(payload["meta"])


def _restore_checked(target: Any, saved: Any, path: Path, where: str) -> Any:
    _check_shapes(target, saved, path, where)
    return jax.tree.map(lambda t, s: np.asarray(s, dtype=np.asarray(t).dtype), target, saved)


def _check_shapes(target: Any, saved: Any, path: Path, where: str) -> None:
    if isinstance(target, dict):
        if not isinstance(saved, dict) or set(map(str, target)) != set(map(str, saved)):
            got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointError(
                f"{path}: {where} does not match this model's config (expected keys "
                f"{sorted(map(str, target))}, found {got})"
            )
        for k in target:
            _check_shapes(target[k], saved[k if k in saved else str(k)], path, f"{where}/{k}")
        return
    t_shape, s_shape = np.shape(target), np.shape(saved)
    if t_shape != s_shape:
        raise CheckpointError(
            f"{path} does not match this model's config: {where} has shape {s_shape}, the config expects {t_shape}"
        )
