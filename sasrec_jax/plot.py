"""`sasrec-jax plot RUN_DIR`: a run's training curves, read from its history.csv and drawn into a PNG (matplotlib,
Agg canvas: no display, and the application's pyplot backend is left alone)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from sasrec_jax import files, runs
from sasrec_jax.errors import CheckpointError, SasrecError

CURVES_PNG = "curves.png"
NEEDED = ("epoch", "train_loss", "valid_ndcg@10", "valid_hr@10")


def read_history(run_dir: Path) -> dict[str, list[float]]:
    """history.csv of `run_dir` as columns of floats (NaN where a cell is empty, e.g. valid_loss in a run written
    before that column existed); CheckpointError naming the problem when there is nothing to draw."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    path = run_dir / runs.HISTORY
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a run writes it at its first validation")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not rows:
        raise CheckpointError(f"{path} has no rows yet: the first validation writes one")
    missing = [c for c in NEEDED if c not in rows[0]]
    if missing:
        raise CheckpointError(f"{path} lacks the columns {', '.join(missing)}: is it a sasrec-jax history?")
    columns: dict[str, list[float]] = {}
    for name in (*NEEDED, "valid_loss", "step"):
        try:
            columns[name] = [float(row.get(name) or "nan") for row in rows]
        except ValueError as e:
            raise CheckpointError(f"{path}: column {name} holds a value that is not a number ({e})") from None
    return columns


def epochs_done(history: dict[str, list[float]]) -> list[float]:
    """Where each validation happened, in epochs trained: a run stopped by its budget inside an epoch validates at,
    say, 3.18 rather than 4. An epoch's steps come from a row followed by a later epoch (one surely complete);
    without one (or without the step column), the epoch numbers as written."""
    epochs, steps = history["epoch"], history["step"]
    complete = [i for i in range(len(epochs) - 1) if epochs[i + 1] > epochs[i] and math.isfinite(steps[i])]
    if not complete:
        return epochs
    per_epoch = steps[complete[0]] / epochs[complete[0]]
    return [s / per_epoch if math.isfinite(s) else e for s, e in zip(steps, epochs)]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draws the training and validation loss, and the validation NDCG@10 and HR@10, per epoch, into `out`
    (default RUN_DIR/curves.png, replaced atomically); returns the path written."""
    history = read_history(run_dir)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise SasrecError("plot needs matplotlib: pip install matplotlib") from None
    out = out if out is not None else run_dir / CURVES_PNG
    epochs = epochs_done(history)
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig renders without any GUI backend
    loss, ranking = fig.subplots(1, 2)
    loss.plot(epochs, history["train_loss"], "o-", label="training loss")
    if any(math.isfinite(v) for v in history["valid_loss"]):
        loss.plot(epochs, history["valid_loss"], "s-", label="validation loss (full softmax)")
    loss.set(xlabel="epochs trained", ylabel="cross-entropy", title="loss")
    ranking.plot(epochs, history["valid_ndcg@10"], "o-", label="NDCG@10")
    ranking.plot(epochs, history["valid_hr@10"], "s-", label="HR@10")
    best = max(range(len(epochs)), key=lambda i: history["valid_ndcg@10"][i])
    ranking.axvline(epochs[best], color="grey", linestyle=":", label=f"best: epoch {history['epoch'][best]:g}")
    ranking.set(xlabel="epochs trained", ylabel="validation metric", title="validation ranking")
    for ax in (loss, ranking):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run_dir.resolve().name}: {len(epochs)} validations")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_bytes(out, buf.getvalue())
    return out
