"""Shared fixtures: tiny hand-built data and configs, and the trained artefacts many tests only read (one fitted
model with its run directory, one bundle exported from it, one run directory written by `sasrec-jax train`), built
once per test session so that the suite trains each of them once."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

DATA_DIR = os.environ.get("SASREC_DATA_DIR", "")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="SASREC_DATA_DIR not set: real MovieLens data unavailable")

# Every `fit` jits its own train step, scorer and ranking, and most tests fit models of a handful of identical
# shapes: compiling them took ~5 s of every fit. XLA's persistent compilation cache, in a directory of this session
# only, compiles each program once. The variables also reach the subprocesses the tests start (`sasrec-jax`
# commands, notebook kernels). Compiled programs are the same either way: nothing a test checks depends on it.
_COMPILATION_CACHE = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_CACHE_DIR = pytest.StashKey[str]()


def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # set by the caller (or by an outer pytest): theirs
        return
    cache_dir = tempfile.mkdtemp(prefix="sasrec-tests-xla-cache-")
    config.stash[_CACHE_DIR] = cache_dir
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": cache_dir, **_COMPILATION_CACHE})
    if "jax" in sys.modules:  # imported before this hook (by a plugin): the variables were read already
        import jax

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    cache_dir = config.stash.get(_CACHE_DIR, None)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)


def cycle_frame(num_users: int = 240, num_items: int = 20, length: int = 12, seed: int = 0) -> pd.DataFrame:
    """Every user walks the deterministic cycle i -> i+1 (mod V) from a random start: perfectly predictable."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, num_items, size=num_users)
    steps = np.arange(length)
    items = (starts[:, None] + steps[None]) % num_items + 1
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(num_users), length),
            "item_id": items.reshape(-1),
            "timestamp": np.tile(steps, num_users) + 1000,
        }
    )


# The one tiny configuration of the training tests, trained on `tiny_cycle()`: XLA then compiles its train step,
# scorer and ranking once per session, and every further fit takes about a second. The data keeps it so: 192 users
# of 10 items leave 7 training targets in every row (one row per user with any `--train-windows`), so every batch of
# 32 rows gathers the same number of positions (one shape of the train step), and an epoch is 6 full batches (the
# warm-up, at most one epoch and at most all steps but one, is then the same 5 steps whatever the number of epochs).
# A test with another shape or setting pays a compilation.
TINY_DATA = dict(num_users=192, length=10)
TINY_MODEL = dict(max_len=8, dim=16, num_heads=2, num_blocks=2)  # dropout: ModelConfig's default (0.1)
TINY_TRAIN = dict(lr=1e-2, batch_size=32, warmup_steps=5)
# the same as `sasrec-jax train` options
TINY_FLAGS = [
    *("--max-len", "8", "--dim", "16", "--heads", "2", "--blocks", "2"),
    *("--lr", "0.01", "--batch-size", "32", "--warmup-steps", "5", "--no-progress"),
]


def tiny_cycle(**overrides) -> pd.DataFrame:
    """The cycle data of the tiny configuration (`TINY_DATA`)."""
    return cycle_frame(**{**TINY_DATA, **overrides})


@pytest.fixture
def cycle_df() -> pd.DataFrame:
    return cycle_frame()


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR:
        pytest.skip("SASREC_DATA_DIR not set: real MovieLens data unavailable")
    return Path(DATA_DIR)


# ---------------------------------------------------------------------------------------------------------
# Trained once per session, read by many tests. A test that changes a run directory copies it first
# (shutil.copytree into its tmp_path); a test that changes the fitted model's state uses SASRec.load instead.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fitted_model(tmp_path_factory):
    """The estimator of the tiny configuration fitted on the "sku" cycle (tests/serve_bundles.py); it has learnt the
    cycle. Read it only: its run directory is `tiny_run_dir`."""
    from tests.serve_bundles import tiny_fit

    return tiny_fit(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """The run directory of `fitted_model`, as `sasrec-jax train` leaves one (checkpoints, config.json,
    history.csv, metrics.json)."""
    from tests.serve_bundles import tiny_run

    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    """`tiny_run_dir` exported to a serving bundle."""
    from tests.serve_bundles import tiny_bundle

    return tiny_bundle(tmp_path_factory)


# The shared CLI run: the tiny configuration (every one of its flags differs from the option's default, so a test can
# see them reach config.json and survive a --resume that does not repeat them), with other column names.
CLI_RUN_EPOCHS = 2
CLI_RUN_FLAGS = [
    *("--user-col", "visitor", "--item-col", "product", "--time-col", "ts"),
    *TINY_FLAGS,
    *("--epochs", str(CLI_RUN_EPOCHS)),
]


@dataclass(frozen=True)
class CliRun:
    """A run directory written by `sasrec-jax train` on a CSV file, with what the command printed."""

    run: Path
    csv: Path
    code: int
    out: str
    err: str

    def train_args(self, out: Path) -> list[str]:
        """The same `sasrec-jax train` command line, writing to `out`."""
        return ["train", "--data", str(self.csv), "--out", str(out), *CLI_RUN_FLAGS]


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory) -> CliRun:
    """`sasrec-jax train` on the cycle written as CSV with other column names (visitor, product, ts)."""
    from sasrec_jax import cli

    root = tmp_path_factory.mktemp("cli_run")
    csv = root / "events.csv"
    events = tiny_cycle().rename(columns={"user_id": "visitor", "item_id": "product", "timestamp": "ts"})
    events.to_csv(csv, index=False)
    run = root / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["train", "--data", str(csv), "--out", str(run), *CLI_RUN_FLAGS])
    assert code == 0, err.getvalue()
    return CliRun(run, csv, code, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------------------------------------------------
# A clock for time-budget tests: the budget runs out after a given number of training steps, on any machine.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def budget_used_up_after(monkeypatch):
    """`budget_used_up_after(n)` makes the training loop's clock (budget.Clock.used) report no time used until n
    training steps have been taken, and twice the budget from then on: a run with `max_minutes` then stops right
    after its n-th step, however fast the machine is. Runs without a budget are unaffected (an infinite budget is
    never exceeded)."""
    from sasrec_jax import budget, train

    taken = [0]
    make_train_step = train.make_train_step

    def counting_train_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def counted(*a, **kw):
            taken[0] += 1
            return step(*a, **kw)

        return counted

    def install(n: int) -> None:
        taken[0] = 0
        monkeypatch.setattr(train, "make_train_step", counting_train_step)
        monkeypatch.setattr(budget.Clock, "used", lambda self: 2 * self.budget_s if taken[0] >= n else 0.0)

    return install


def pytest_sessionfinish(session, exitstatus):
    """In CI every test must run: a skip there means a missing extra, tool or data set, so it fails the run."""
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        for report in skipped:
            reporter.write_line(f"CI: skipped test is an error: {report.nodeid} {report.longrepr}", red=True)
        session.exitstatus = 1
