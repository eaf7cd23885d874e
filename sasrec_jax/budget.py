"""The time budget of a run (`--max-minutes`): the clock training runs against, and the plan that sizes the
validations and the final evaluation so that the whole command ends within the budget."""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from sasrec_jax import evaluate
from sasrec_jax.config import TrainConfig
from sasrec_jax.data import SequenceSet, Split

# The final evaluation (the model and three baselines on the test users, the model on the validation users) may
# take this share of a --max-minutes budget; past it, a seeded sample of the test users that fits is ranked.
FINAL_EVAL_SHARE = 0.25
# When the baselines are not timed, each baseline's ranking is counted as one model ranking: at large catalogues
# ranking [B, V] scores, not computing them, is most of the cost, and a baseline ranks the same [B, V] block.
FINAL_EVAL_RANKINGS = 4


@dataclass(frozen=True)
class EvalPlan:
    """Which validation and test users are ranked, and what that is expected to cost (seconds per batch)."""

    valid_rows: np.ndarray
    test_users: int  # how many test users the final evaluation ranks (a seeded sample when < len(test))
    batch_size: int
    batch_seconds: float  # one batch of the model: scores and their ranking
    baseline_seconds: float  # one batch of the three baselines together
    compile_seconds: float = 0.0  # the final evaluation's scorer is compiled once more (the estimator's own)

    def seconds(self, users: int, per_batch: float | None = None) -> float:
        return math.ceil(users / self.batch_size) * (self.batch_seconds if per_batch is None else per_batch)

    def final_seconds(self) -> float:
        """The model on the validation and the test users, the baselines on the test users."""
        test_batch = self.batch_seconds + self.baseline_seconds
        return self.compile_seconds + self.seconds(len(self.valid_rows)) + self.seconds(self.test_users, test_batch)


def plan_evaluation(
    cfg: TrainConfig,
    split: Split,
    time_batch: Callable[[SequenceSet], float],
    batch_size: int,
    budget_s: float,
    log,
    *,
    time_baselines: Callable[[SequenceSet], float] | None = None,
) -> EvalPlan:
    """Samples the validation users, times one ranking batch (of the model, and of the baselines when
    `time_baselines` is given), and sizes the final evaluation to the budget.

    Each timing is taken twice and the second kept: the first call compiles. What the model's first call took
    beyond the second is counted once in the final evaluation, which compiles a scorer of its own."""
    valid_rows = evaluate.sample_rows(len(split.valid), cfg.valid_users, cfg.seed)
    batch = split.valid.take(valid_rows[:batch_size])
    first = time_batch(batch)
    batch_seconds = time_batch(batch)
    compile_seconds = max(first - batch_seconds, 0.0)
    if time_baselines is None:
        baseline_seconds = (FINAL_EVAL_RANKINGS - 1) * batch_seconds
    else:
        time_baselines(batch)
        baseline_seconds = time_baselines(batch)
    n_test = len(split.test) if not cfg.test_users else min(cfg.test_users, len(split.test))
    plan = EvalPlan(valid_rows, n_test, batch_size, batch_seconds, baseline_seconds, compile_seconds)
    if plan.final_seconds() > FINAL_EVAL_SHARE * budget_s:
        spare = FINAL_EVAL_SHARE * budget_s - plan.seconds(len(valid_rows)) - compile_seconds
        per_user = (batch_seconds + baseline_seconds) / batch_size
        fits = max(batch_size, int(spare / per_user) // batch_size * batch_size)
        log(
            f"final evaluation: all {n_test:,} test users would take ~{minutes(plan.final_seconds())}, more than "
            f"{FINAL_EVAL_SHARE:.0%} of the budget; it will rank a seeded sample of {min(fits, n_test):,} "
            f"(`sasrec-jax evaluate RUN_DIR --test-users 0` ranks them all later)"
        )
        plan = EvalPlan(valid_rows, min(fits, n_test), batch_size, batch_seconds, baseline_seconds, compile_seconds)
    sampled = (
        f"a seeded sample of {len(valid_rows):,} of {len(split.valid):,}"
        if len(valid_rows) < len(split.valid)
        else f"all {len(valid_rows):,}"
    )
    log(
        f"validation: {sampled} users, ~{minutes(plan.seconds(len(valid_rows)))} each time; final evaluation of "
        f"{plan.test_users:,} test users with baselines: ~{minutes(plan.final_seconds())}"
    )
    return plan


def minutes(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# When a fit's time budget starts (a time.perf_counter() value); unset: when fit is called.
_started: contextvars.ContextVar[float | None] = contextvars.ContextVar("budget_started", default=None)


@contextmanager
def budget_counted_from(started: float):
    """Inside, the time budget of `fit` counts from `started` (a time.perf_counter() value) instead of from the
    call of fit: `sasrec-jax train` starts it with the command, so that --max-minutes bounds the command's wall
    time, start-up and data loading included."""
    token = _started.set(started)
    try:
        yield
    finally:
        _started.reset(token)


def _start() -> float:
    started = _started.get()
    return time.perf_counter() if started is None else started


@dataclass
class Clock:
    """The run's time budget: training stops early enough for the last validation and the final evaluation."""

    budget_s: float  # math.inf without --max-minutes
    started: float = field(default_factory=_start)
    reserve_s: float = 0.0

    def used(self) -> float:
        return time.perf_counter() - self.started

    @property
    def training_s(self) -> float:
        return max(self.budget_s - self.reserve_s, 0.0)

    def training_over(self) -> bool:
        return self.used() > self.training_s
