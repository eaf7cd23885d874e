"""What a run shows and records while it trains: the one progress bar of the whole run with its time left, and the
training curves behind `--log-to` (TensorBoard event files, a CSV of the same scalars) in RUN_DIR/logs/."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

from sasrec_jax.errors import ConfigError

LOGS_DIR = "logs"
METRICS_CSV = "metrics.csv"
CSV_COLUMNS = ("wall_time", "step", "epoch", "tag", "value")
# The training loss is logged as the mean of this many steps: one point per step is noise at batch 64–128.
TRAIN_LOSS_EVERY = 10


# ---------------------------------------------------------------------------------------------------------
# The progress bar of the whole run
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeLeft:
    seconds: float  # until training and its last validation are done (inf: not known yet)
    by_budget: bool  # the time budget ends training before the epochs do


def time_left(
    *, steps_left: int, steps_per_s: float, validations_left: int, validation_s: float, training_left_s: float
) -> TimeLeft:
    """How long training (and the validations still to come) will last: the epochs' way (the steps left at the
    measured rate, and a validation per epoch left) or the budget's way (training stops when its share of the
    budget is used up, then validates once), whichever ends first. The budget's way is what the loop enforces, so
    the answer never reaches past the budget; `training_left_s` is inf without a budget, `steps_per_s` 0 before
    it is measured."""
    by_epochs = steps_left / steps_per_s + validations_left * validation_s if steps_per_s > 0 else math.inf
    by_budget = max(training_left_s, 0.0) + validation_s
    return TimeLeft(by_budget, True) if by_budget < by_epochs else TimeLeft(by_epochs, False)


def clock_text(seconds: float) -> str:
    """1:05, 12:00, 1:02:03; "?" for an unknown time."""
    if not math.isfinite(seconds):
        return "?"
    s = max(int(round(seconds)), 0)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class RunBar:
    """One bar for the whole run, on screen from the first step to the last validation: "epoch 4/200", the share
    of the run's expected time elapsed, the time left (following the budget when there is one), then the detail
    of the moment (batch, steps/s, loss, memory). Validation draws its own bar below it (`position=1`)."""

    REFRESH_S = 1.0  # a redraw per step would cost more than a small model's step; the clock shows seconds

    def __init__(self, enabled: bool, epoch: int, epochs: int, final_s: float | None):
        from tqdm.auto import tqdm

        self.epochs, self.final_s, self._drawn = epochs, final_s, 0.0
        self.bar = tqdm(
            total=1000,  # per mille of the expected time: the time left moves with the measured rates
            desc=f"epoch {min(epoch, epochs)}/{epochs}",
            disable=not enabled,
            leave=True,
            position=0,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix[0]}",
            postfix=["starting"],
        )

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def due(self) -> bool:
        """Whether a redraw is due (the caller then gathers the detail: reading the memory costs a syscall)."""
        return self.enabled and time.perf_counter() - self._drawn >= self.REFRESH_S

    def show(self, *, epoch: int, used_s: float, left: TimeLeft, detail: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._drawn < self.REFRESH_S):
            return
        self._drawn = now
        total = used_s + left.seconds
        fraction = used_s / total if math.isfinite(total) and total > 0 else 0.0
        text = f"{clock_text(used_s)} elapsed, {clock_text(left.seconds)} left"
        text += " (time budget)" if left.by_budget else ""
        if self.final_s is not None:  # reserved in the budget, after this bar ends
            text += f", then the final evaluation ~{clock_text(self.final_s)}"
        self.bar.set_description_str(f"epoch {min(epoch, self.epochs)}/{self.epochs}", refresh=False)
        self.bar.postfix[0] = f"{text} · {detail}" if detail else text
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.refresh()

    def close(self, *, epoch: int, used_s: float, why: str) -> None:
        if self.enabled:
            self.bar.set_description_str(f"epoch {min(epoch, self.epochs)}/{self.epochs}", refresh=False)
            self.bar.postfix[0] = f"{clock_text(used_s)} elapsed · {why}"
            self.bar.n = 1000
            self.bar.refresh()
        self.bar.close()


# ---------------------------------------------------------------------------------------------------------
# --log-to: TensorBoard and CSV
# ---------------------------------------------------------------------------------------------------------


def check_available(targets: tuple[str, ...]) -> None:
    """ConfigError, in one line saying what to install, when a target's library is missing."""
    if "tensorboard" in targets:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--log-to tensorboard needs tensorboardX: pip install tensorboardX (or drop tensorboard from --log-to)"
            ) from None


class Scalars:
    """The training curves, written as they come to the `--log-to` targets in RUN_DIR/logs/ (nothing without any):
    train/loss (the mean of every TRAIN_LOSS_EVERY steps) and train/lr at those steps; train/epoch_loss,
    valid/loss, valid/ndcg_at_10 and valid/hr_at_10 at every validation. TensorBoard gets event files (tensorboardX);
    csv gets the same scalars, one per line, in metrics.csv, appended and flushed as they come (a resumed run
    appends to it)."""

    def __init__(self, targets: tuple[str, ...], run_dir: str | Path | None):
        self._tb = self._file = self._csv = None
        self._losses: list[float] = []
        if not targets:
            return
        if run_dir is None:
            raise ConfigError("log_to writes into the run directory: give fit a run_dir (or leave log_to empty)")
        check_available(targets)
        logdir = Path(run_dir) / LOGS_DIR
        logdir.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in targets:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(logdir), flush_secs=10)
        if "csv" in targets:
            path = logdir / METRICS_CSV
            new = not path.is_file() or path.stat().st_size == 0
            self._file = path.open("a", newline="")
            self._csv = csv.writer(self._file)
            if new:
                self._csv.writerow(CSV_COLUMNS)

    def train_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """One step's loss (steps counted from 1) and the learning rate it was taken with."""
        if self._tb is None and self._csv is None:
            return
        self._losses.append(loss)
        if step % TRAIN_LOSS_EVERY == 0:
            self._write(step, epoch, {"train/loss": sum(self._losses) / len(self._losses), "train/lr": lr})
            self._losses = []

    def validation(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self._write(step, epoch, values)
        self.flush()  # a validation is what a watcher waits for

    def _write(self, step: int, epoch: int, values: dict[str, float]) -> None:
        now = time.time()
        for tag, value in values.items():
            if self._tb is not None:
                self._tb.add_scalar(tag, float(value), global_step=step, walltime=now)
            if self._csv is not None:
                self._csv.writerow([f"{now:.3f}", step, epoch, tag, repr(float(value))])

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._tb = self._file = self._csv = None
