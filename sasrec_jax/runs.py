"""Run directories of the estimator: config.json, the best weights, history.csv and metrics.json, written
atomically and read back through the training restore path (`checkpoint`). `SASRec.save/load/fit(run_dir=…)`
and `sasrec-jax train --resume` go through here."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from sasrec_serve.ids import IdError, ItemVocab

from sasrec_jax import checkpoint, data, distributed, files
from sasrec_jax.config import DataConfig, ModelConfig, TrainConfig, from_dict, to_dict
from sasrec_jax.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from flax import nnx

# one row per validation; "step" tells apart two rows of one epoch (a budget stop inside it, then a resume)
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_ndcg@10", "valid_hr@10", "seconds", "step")
HISTORY, METRICS, SEQUENCES = "history.csv", "metrics.json", "sequences.npz"


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run directory records: the settings, the data description and the vocabulary."""

    model_config: ModelConfig
    train_config: TrainConfig
    data_info: dict
    vocab: ItemVocab

    def config_json(self) -> dict:
        from sasrec_jax import __version__

        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "sasrec_jax_version": __version__,
            "model": to_dict(self.model_config),
            "train": to_dict(self.train_config),
            "data": self.data_info,
            "items": self.vocab.to_json(),
        }


def open_run_dir(run_dir: Path, run: Run, resume: bool, log: Callable[[str], None]) -> None:
    """Checks that `run_dir` may receive this run (resumable, or new) and writes its config.json."""
    checkpoint.refuse_foreign(run_dir, "choose a new run_dir")
    if resume:
        check_resumable(run_dir, run)
    elif (run_dir / checkpoint.CONFIG).exists() and not checkpoint.never_saved(run_dir):
        raise CheckpointError(f"{run_dir} already holds a run: pass resume=True to continue it, or remove it")
    distributed.barrier("sasrec_run_dir_checked")  # every process looked before process 0 writes
    if distributed.is_main():
        for p in files.remove_stale(run_dir) + files.remove_stale(run_dir.parent, run_dir.name):
            log(f"removed {p.name}, left behind by a write that was interrupted")
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(run_dir / checkpoint.CONFIG, run.config_json())
    distributed.barrier("sasrec_run_dir_written")


def check_resumable(run_dir: Path, run: Run) -> None:
    """CheckpointError naming the difference when `run_dir` was trained with another model or other data."""
    saved = checkpoint.read_config(run_dir)
    now = to_dict(run.model_config)
    if saved["model"] != now:
        diff = ", ".join(
            f"{k} {saved['model'].get(k)!r} there, {now.get(k)!r} here"
            for k in sorted(set(saved["model"]) | set(now))
            if saved["model"].get(k) != now.get(k)
        )
        raise CheckpointError(
            f"{run_dir} was trained with a different model config ({diff}); resume it with its own settings "
            "(sasrec-jax train --resume takes them from the run directory)"
        )
    if saved["data"]["fingerprint"] != run.data_info["fingerprint"]:
        raise CheckpointError(f"{run_dir} was trained on different data (fingerprint mismatch); cannot resume")


def save(
    path: Path, run: Run, params: dict, history: list[dict], metrics: dict, sequences: data.Sequences | None
) -> Path:
    """Writes a run directory (config.json, best weights, history.csv, metrics.json when not empty, and the
    training sequences when given). A new
    directory is assembled under a temporary name and renamed into place; an existing run is updated file by file,
    each file atomically."""
    checkpoint.refuse_foreign(path, "save to a new directory")
    if distributed.process_count() > 1:  # every process writes its part in place; process 0 the files
        if distributed.is_main():
            path.mkdir(parents=True, exist_ok=True)
        distributed.barrier("sasrec_save_dir")
    if path.exists():
        _write(path, run, params, history, metrics, sequences)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    files.remove_stale(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=files.temp_prefix(path.name)))
    try:
        _write(tmp, run, params, history, metrics, sequences)
        tmp.chmod(0o755)  # mkdtemp makes 0700 directories
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(
    path: Path, run: Run, params: dict, history: list[dict], metrics: dict, sequences: data.Sequences | None
) -> None:
    if not checkpoint.has_best(path):  # a fitted run has them already; a loaded model saved elsewhere not
        checkpoint.save_best(path, params, {"epoch": run.data_info.get("best_epoch", 0)})
    if not distributed.is_main():
        return
    files.write_json(path / checkpoint.CONFIG, run.config_json())
    write_history(path, history)
    if sequences is not None and not (path / SEQUENCES).is_file():
        write_sequences(path, sequences)
    if metrics:
        files.write_json(path / METRICS, metrics)


def write_sequences(path: Path, seqs: data.Sequences) -> None:
    """sequences.npz: every user's items (and times) as trained on, so that a loaded model recommends to its users
    and evaluates from the run directory alone. Written atomically; numpy arrays only (read without pickle)."""
    users = seqs.users if seqs.users.dtype.kind in "iu" else seqs.users.astype(str)
    arrays: dict[str, Any] = {"users": users, "offsets": seqs.offsets, "items": seqs.items}
    if seqs.times is not None:
        arrays["times"] = seqs.times
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files.atomic_write_bytes(path / SEQUENCES, buf.getvalue())


def read_sequences(path: Path, vocab: ItemVocab, fingerprint: str) -> data.Sequences | None:
    """The sequences a run directory recorded, checked against its data fingerprint; None when it has none."""
    file = path / SEQUENCES
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            users = z["users"]
            seqs = data.Sequences(
                users=users if users.dtype.kind in "iu" else users.astype(object),
                offsets=z["offsets"],
                items=z["items"],
                times=z["times"] if "times" in z else None,
                vocab=vocab,
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise CheckpointError(f"{file} is unreadable ({why}): attach the training data with set_data(df)") from None
    if seqs.fingerprint() != fingerprint:
        raise CheckpointError(
            f"{file} does not hold the data this model was trained on (fingerprint mismatch): attach the training "
            "data with set_data(df)"
        )
    return seqs


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv, one row per validation (`HISTORY_COLUMNS`), replaced atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(HISTORY_COLUMNS)
    for h in history:
        writer.writerow([h.get(c, "") for c in HISTORY_COLUMNS])
    files.atomic_write_text(path / HISTORY, buf.getvalue())


def settings(path: Path, cfg: dict) -> dict:
    """The constructor arguments of the estimator a run was trained with (model, training and data preparation),
    from its config.json `cfg`."""
    try:
        model = {k: v for k, v in to_dict(from_dict(ModelConfig, cfg["model"])).items() if k != "num_items"}
        train = to_dict(from_dict(TrainConfig, cfg["train"]))
        info = cfg["data"]
        prep = {f.name: info.get(f.name, f.default) for f in dataclasses.fields(DataConfig)}
    except (KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{path / checkpoint.CONFIG} is missing or has a malformed entry: {e}") from None
    return {**model, **train, **prep}


class Fitted(NamedTuple):
    """A fitted model as a run directory holds it."""

    run: Run
    graphdef: nnx.GraphDef
    params: dict
    history: list[dict]


def load(path: Path, cfg: dict) -> Fitted:
    """The fitted model of run directory `path` (config.json read as `cfg`): its best weights restored into a
    freshly built model, with its vocabulary checked against the model's size."""
    from sasrec_jax.model import init_model

    model_cfg, train_cfg = from_dict(ModelConfig, cfg["model"]), from_dict(TrainConfig, cfg["train"])
    try:
        vocab = ItemVocab(cfg.get("items"), f"{path / checkpoint.CONFIG}: items")
    except IdError as e:
        raise CheckpointError(str(e)) from None
    if vocab.size != model_cfg.num_items:
        raise CheckpointError(f"{path}: {vocab.size} items in config.json but the model has {model_cfg.num_items}")
    graphdef, target = init_model(model_cfg, 0)
    params = checkpoint.load_best(path, target)
    hist = path / HISTORY
    history = pd.read_csv(hist).to_dict("records") if hist.is_file() else []
    return Fitted(Run(model_cfg, train_cfg, cfg["data"], vocab), graphdef, params, history)
