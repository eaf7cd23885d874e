"""Run directories: config.json plus Orbax checkpoints, written atomically and read without running code.

Layout of a run directory:
  config.json              format version, model/train config, item vocabulary, data description
  checkpoint/state/<n>/    params + optimizer state + loop state: what `--resume` continues from, also from inside
                           an epoch (saved every `checkpoint_minutes` and around every validation; the newest
                           KEEP_STATE are kept)
  checkpoint/best/<step>/  the weights of the best validation so far (what evaluation and export load), chosen by
                           validation NDCG@10; the best KEEP_BEST are kept
  metrics.json, history.csv

Checkpoints are Orbax's (`orbax.checkpoint.CheckpointManager`): every process of a multi-process run takes part in
a save and the primary process writes replicated arrays once; a save lands under a temporary name and is renamed
when complete, so a kill leaves the previous checkpoint readable (leftover temporaries are removed on the next
start); saves are asynchronous: training goes on while the files are written. Orbax stores arrays (TensorStore)
and JSON: loading never executes code.

Run directories written before the Orbax layout hold `checkpoint/best.msgpack` / `last.msgpack` (flax msgpack): they are
still read (evaluate, export, recommend, and `--resume`, which continues them in the new layout).
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from sasrec_serve.bundle import sha256_file

from sasrec_jax.errors import CheckpointError
from sasrec_jax.files import is_temporary, json_default, remove_stale, write_json

FORMAT_VERSION = 1
CONFIG = "config.json"
STATE_DIR = "checkpoint/state"
BEST_DIR = "checkpoint/best"
LEGACY_LAST = "checkpoint/last.msgpack"  # the layout before Orbax: read, never written
LEGACY_BEST = "checkpoint/best.msgpack"
KEEP_STATE = 2  # resume points kept: the newest, and the one before it
KEEP_BEST = 1  # best-validation weights kept
BEST_METRIC = "NDCG@10"


def refuse_foreign(path: str | Path, fix: str) -> None:
    """Refuses to write a run into `path` when it is a file, or a non-empty directory without config.json (not
    written by sasrec-jax): nothing there is touched. `fix` ends the message (what to do instead)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a directory: {fix}")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG).is_file():
        raise CheckpointError(
            f"{path} is not empty and is not a sasrec-jax run directory (no {CONFIG}): it is left untouched; {fix}"
        )


def never_saved(run_dir: str | Path) -> bool:
    """True for a run directory holding only its config.json (and checkpoint folders with no finished save): a run
    stopped before its first checkpoint, which can be started again in place without losing anything."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        return False
    ckpt = run_dir / "checkpoint"
    others = [p for p in run_dir.iterdir() if p.name not in (CONFIG, ckpt.name) and not is_temporary(p.name)]
    if others or (ckpt.exists() and not ckpt.is_dir()):
        return False
    return not (saved_steps(run_dir / STATE_DIR) or saved_steps(run_dir / BEST_DIR) or (run_dir / LEGACY_LAST).exists())


def saved_steps(directory: Path) -> list[int]:
    """The finished saves in an Orbax directory (temporaries of an interrupted save are not steps)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


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


def load_msgpack(path: str | Path, params_target: Any, opt_target: Any = None) -> tuple[Any, Any, dict]:
    """Reads a checkpoint of the msgpack layout (before Orbax) into the given targets, checking every shape."""
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


# ---------------------------------------------------------------------------------------------------------
# Orbax
# ---------------------------------------------------------------------------------------------------------


def _abstract(tree: Any) -> Any:
    """What Orbax restores into: each leaf's shape and dtype, and the sharding of a jax.Array (so a multi-process
    run gets its replicated global arrays back); numpy leaves come back as numpy arrays."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.zeros(np.shape(x), np.asarray(x).dtype)

    return jax.tree.map(leaf, tree)


def _manager(directory: Path, keep: int, *, asynchronous: bool, best: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda metrics: metrics[BEST_METRIC]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,  # an interrupted save leaves a temporary: removed here
        create=True,
        # Orbax names its cross-process barriers after the step: without a prefix per manager, a resume point and
        # a best save numbered alike collide ("Barrier _async_write_complete.12 is already ongoing") and hang
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"sasrec_{directory.name}"),
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _restore_error(path: Path, e: Exception) -> CheckpointError:
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return CheckpointError(
        f"{path} cannot be restored into this model ({type(e).__name__}: {first[:300]}); it is corrupt or was "
        "written for another model config"
    )


CHECKSUMS_DIR = "checkpoint/checksums"  # <kind>-<step>.json: sha256 of every file of a finished save


def _hash_files(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _sums_file(directory: Path, step: int) -> Path:
    """directory is <run>/checkpoint/state or <run>/checkpoint/best."""
    return directory.parent.parent / CHECKSUMS_DIR / f"{directory.name}-{step}.json"


def record_checksums(directory: Path) -> None:
    """Writes the checksums of every finished save in `directory` that has none yet, and drops those of saves
    Orbax has since deleted. Orbax keeps no checksums of its own (a flipped bit restores silently)."""
    steps = saved_steps(directory)
    for step in steps:
        target = _sums_file(directory, step)
        if not target.is_file():
            try:
                files = _hash_files(directory / str(step))
            except FileNotFoundError:
                continue  # deleted by Orbax meanwhile (older than the saves it keeps)
            write_json(target, {"step": step, "files": files})
    sums = directory.parent.parent / CHECKSUMS_DIR
    if sums.is_dir():
        for p in sums.glob(f"{directory.name}-*.json"):
            number = p.stem.rpartition("-")[2]
            if number.isdigit() and int(number) not in steps:
                p.unlink(missing_ok=True)


def _record_quietly(directory: Path) -> None:
    try:
        record_checksums(directory)
    except FileNotFoundError:
        pass  # a save Orbax deleted while it was being hashed (older than the ones it keeps): nothing to record
    except OSError as e:
        logging.getLogger(__name__).warning("could not write the checksums of %s: %s", directory, e)


def verify_checksums(directory: Path, step: int) -> bool:
    """Checks the files of one save against its recorded checksums; False when none were recorded (a save
    whose process ended before recording them, or a run directory from before checksums)."""
    target = _sums_file(directory, step)
    if not target.is_file():
        return False
    where = directory / str(step)
    try:
        files = json.loads(target.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{target} is corrupt ({e}); remove it to use {where} unverified") from None
    for rel, expected in files.items():
        path = where / rel
        if not path.is_file():
            raise CheckpointError(f"{where} is incomplete: {rel} is missing (the run directory is damaged)")
        if sha256_file(path) != expected:
            raise CheckpointError(
                f"{where} is corrupt: {rel} does not match its checksum (a changed or damaged file); "
                "restore the run directory from a copy, or train again"
            )
    return True


def nonfinite(tree: Any) -> str | None:
    """The path of the first leaf of `tree` holding NaN or infinity, or None when every value is finite."""
    import jax.numpy as jnp

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        if x.dtype.kind == "f" or str(x.dtype) == "bfloat16":
            if not bool(jnp.isfinite(x).all()):
                return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return None


def _nbytes(*trees: Any) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
               for t in trees for x in jax.tree.leaves(t))  # fmt: skip


def free_bytes(directory: Path) -> int:
    """Free space on the file system of `directory` (or of its nearest existing parent)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "File too large" in text:
            return True  # TensorStore reports the OS error in its own exception types
        e = e.__cause__ or e.__context__
    return False


def _space_error(directory: Path, step: int, need: int) -> CheckpointError:
    return CheckpointError(
        f"not enough disk space for checkpoint {step} in {directory}: it needs about {need / 1e6:,.0f} MB, "
        f"{free_bytes(directory) / 1e6:,.0f} MB are free. The previous checkpoint is intact: free some space, "
        "then continue with --resume"
    )


class Checkpoints:
    """The resume points and best weights of one run directory. Every process of a run creates it and calls
    every save and restore (they are collective); `wait()` blocks until pending asynchronous saves are on disk."""

    def __init__(self, run_dir: str | Path, *, asynchronous: bool = True):
        self.run_dir = Path(run_dir)
        if jax.process_index() == 0:
            remove_stale(self.run_dir / CHECKSUMS_DIR)  # checksum files whose writer was killed
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sasrec-checksums")
        self._hashing: list[concurrent.futures.Future] = []
        self._pending: dict[Path, tuple[int, int]] = {}  # manager directory -> (step, bytes) of its last save
        self.state = _manager(self.run_dir / STATE_DIR, KEEP_STATE, asynchronous=asynchronous)
        self.best = _manager(self.run_dir / BEST_DIR, KEEP_BEST, asynchronous=asynchronous, best=True)

    def has_state(self) -> bool:
        return self.state.latest_step() is not None or (self.run_dir / LEGACY_LAST).is_file()

    def save_state(self, params: Any, opt_state: Any, meta: dict) -> None:
        """A new resume point (numbered after the last one; the loop state inside says where training is)."""
        import orbax.checkpoint as ocp

        self._finish(self.state)
        latest = self.state.latest_step()
        step = 0 if latest is None else latest + 1
        _refuse_nonfinite(params, f"resume point {step}", meta.get("step"))
        meta = json.loads(json.dumps(meta, default=json_default))
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self._save(self.state, step, args, _nbytes(params, opt_state))

    def _save(self, manager, step: int, args, need: int, **kw) -> None:
        directory = Path(manager.directory)
        if free_bytes(directory) < need:
            raise _space_error(directory, step, need)
        try:
            self._pending[directory] = (step, need)  # what a disk-full error surfacing at the wait is about
            manager.save(step, args=args, force=True, **kw)
        except Exception as e:
            if _disk_full(e):
                raise _space_error(directory, step, need) from None
            raise

    def _finish(self, manager) -> None:
        """Waits for the manager's pending save, then records the checksums of what it finished."""
        directory = Path(manager.directory)
        try:
            manager.wait_until_finished()
        except Exception as e:
            if _disk_full(e):
                raise _space_error(directory, *self._pending.get(directory, (-1, 0))) from None
            raise
        if jax.process_index() == 0:  # hashing reads the whole save: off the training loop's thread
            self._hashing.append(self._hasher.submit(_record_quietly, directory))

    def restore_state(self, params: Any, opt_state: Any) -> tuple[Any, Any, dict]:
        """The newest resume point, restored like the given (possibly sharded) targets."""
        step = self.state.latest_step()
        if step is None:
            return load_msgpack(self.run_dir / LEGACY_LAST, jax.device_get(params), jax.device_get(opt_state))
        items = {"params": params, "opt_state": opt_state}
        out = _restore(self.state, step, self.run_dir / STATE_DIR, items)
        return out["params"], out["opt_state"], out["meta"]

    def save_best(self, step: int, params: Any, meta: dict, metric: float) -> None:
        import orbax.checkpoint as ocp

        self._finish(self.best)
        if step in self.best.all_steps():  # a resumed run validating the same step again
            return
        _refuse_nonfinite(params, "the best weights", step)
        meta = json.loads(json.dumps(meta, default=json_default))
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        self._save(self.best, step, args, _nbytes(params), metrics={BEST_METRIC: float(metric)})

    def wait(self) -> None:
        """Blocks until every save is on disk and its checksums are written."""
        self._finish(self.state)
        self._finish(self.best)
        while self._hashing:
            self._hashing.pop(0).result()

    def close(self) -> None:
        self.state.close()
        self.best.close()
        self._hasher.shutdown(wait=True)


def _refuse_nonfinite(params: Any, what: str, step) -> None:
    from sasrec_jax.errors import TrainingError

    bad = nonfinite(params)
    if bad is not None:
        at = f" at step {step}" if step is not None else ""
        raise TrainingError(
            f"the weights hold NaN or infinity ({bad}){at}: {what} was not written, the last good checkpoint stays. "
            "Training diverged: continue with --resume and a lower --lr"
        )


def has_best(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return bool(saved_steps(run_dir / BEST_DIR)) or (run_dir / LEGACY_BEST).is_file()


def save_best(run_dir: str | Path, params: Any, meta: dict, metric: float = 0.0, step: int = 0) -> None:
    """Writes best weights to a run directory (e.g. `SASRec.save` of a model loaded from elsewhere)."""
    ckpt = Checkpoints(run_dir, asynchronous=False)
    try:
        ckpt.save_best(step, params, meta, metric)
        ckpt.wait()  # records the checksums
    finally:
        ckpt.close()


def load_best(run_dir: str | Path, params_target: Any) -> Any:
    """The best-validation weights of a run directory, as numpy arrays shaped like `params_target`."""
    run_dir = Path(run_dir)
    directory = run_dir / BEST_DIR
    if not saved_steps(directory):
        legacy = run_dir / LEGACY_BEST
        if legacy.is_file():
            return load_msgpack(legacy, params_target)[0]
        raise CheckpointError(f"checkpoint not found: {run_dir} has no best weights ({BEST_DIR}/ is empty or missing)")
    manager = _reader(directory, best_fn=lambda m: m[BEST_METRIC], best_mode="max")
    try:
        step = manager.best_step()
        step = saved_steps(directory)[-1] if step is None else step
        return _restore(manager, step, directory, {"params": jax.device_get(params_target)})["params"]
    finally:
        manager.close()


def read_state(run_dir: str | Path, targets: dict | None = None) -> dict:
    """The newest resume point of a run directory as numpy: its loop state ("meta") and the items of `targets`
    ({"params": tree} and/or {"opt_state": tree}) shaped like them. For inspection and tests; training resumes
    through `Checkpoints.restore_state`."""
    directory = Path(run_dir) / STATE_DIR
    steps = saved_steps(directory)
    if not steps:
        raise CheckpointError(f"checkpoint not found: {run_dir} has no resume point ({STATE_DIR}/ is empty or missing)")
    manager = _reader(directory)
    try:
        return _restore(manager, steps[-1], directory, {k: jax.device_get(v) for k, v in (targets or {}).items()})
    finally:
        manager.close()


def _restore(manager, step: int, directory: Path, targets: dict) -> dict:
    """Restores `targets`' items and the meta of one step, every error one CheckpointError line."""
    import orbax.checkpoint as ocp

    verify_checksums(directory, step)
    args = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in targets.items()}
    try:
        out = manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax/TensorStore raise many types for a missing, corrupt or mismatched array
        raise _restore_error(directory / str(step), e) from None
    for name, tree in targets.items():  # Orbax gives numpy targets the saved shapes: check them here
        saved = serialization.to_state_dict(out[name])
        _check_shapes(serialization.to_state_dict(tree), saved, directory / str(step), name)
    return {**{name: out[name] for name in targets}, "meta": dict(out["meta"] or {})}


def _reader(directory: Path, **options):
    """A read-only CheckpointManager (loading never writes into a run directory, which may be training), without
    Orbax's warning that it is read-only."""
    import orbax.checkpoint as ocp

    def not_the_read_only_notice(record: logging.LogRecord) -> bool:
        return "read only" not in record.getMessage()

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(not_the_read_only_notice)
    try:
        opts = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False, **options)
        return ocp.CheckpointManager(directory.absolute(), options=opts)
    finally:
        absl_logger.removeFilter(not_the_read_only_notice)
