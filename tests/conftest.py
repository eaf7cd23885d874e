"""Shared fixtures: tiny hand-built data and configs so every test runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

DATA_DIR = os.environ.get("SASREC_DATA_DIR", "")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="SASREC_DATA_DIR not set: real MovieLens data unavailable")


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


@pytest.fixture
def cycle_df() -> pd.DataFrame:
    return cycle_frame()


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR:
        pytest.skip("SASREC_DATA_DIR not set: real MovieLens data unavailable")
    return Path(DATA_DIR)


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
