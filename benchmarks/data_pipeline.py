"""Benchmarks the data layer (interactions → sequences → leave-one-out → padded rows) for speed and peak RSS."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

TARGET_SECONDS = 15.0
TARGET_PEAK_RSS_MB = 3 * 1024.0
ZIPF_EXPONENT = 1.0  # classic Zipf: item of popularity rank r is drawn with probability ∝ 1 / r
TIME_RANGE = (1_500_000_000, 1_700_000_000)  # unix seconds, ~6 years
CHECK_USERS = 1_000  # users whose sequences are compared with the naive baseline's (untimed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=300_000)
    p.add_argument("--items", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--skip-naive", action="store_true", help="do not time the pandas sort+groupby baseline")
    return p.parse_args(argv)


def generate(events: int, users: int, items: int, seed: int) -> pd.DataFrame:
    """A synthetic log: uniform users, Zipf-skewed items, random timestamps, rows in random order."""
    rng = np.random.default_rng(seed)
    # inverse-CDF sampling of popularity ranks; np.random.zipf is unbounded and cannot be capped at `items`
    cdf = np.cumsum(1.0 / np.arange(1, items + 1) ** ZIPF_EXPONENT)
    ranks = np.searchsorted(cdf, rng.random(events) * cdf[-1], side="right")
    # a random rank → id map, so popular items do not also have the smallest ids
    item_of_rank = rng.permutation(items).astype(np.int64)
    # every column is drawn independently, so the rows are already in random (log-like) order
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, users, events, dtype=np.int64),
            "item_id": item_of_rank[np.minimum(ranks, items - 1)],
            "timestamp": rng.integers(*TIME_RANGE, events, dtype=np.int64),
        }
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb() -> float | None:
    """Current RSS from /proc (Linux only): shows how much the pipeline still holds, unlike the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def naive(df: pd.DataFrame) -> pd.Series:
    """The usual pandas idiom: one Python list of item ids per user, in time order."""
    return df.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id")["item_id"].apply(list)


def same_sequences(seqs, lists: pd.Series, n: int, seed: int) -> bool:
    """Whether a random sample of users gets identical sequences from both implementations (a sanity check)."""
    if len(lists) != seqs.num_users:
        return False
    rows = np.random.default_rng(seed).choice(seqs.num_users, size=min(n, seqs.num_users), replace=False)
    return all(
        seqs.users[u] == lists.index[u] and seqs.vocab.ids[seqs.user_items(u) - 1].tolist() == lists.iloc[u]
        for u in rows
    )


def run_child(args: argparse.Namespace) -> dict:
    """Everything measured, in a fresh process so its ru_maxrss covers only the frame and the pipeline."""
    from sasrec_jax import data  # imported here: the parent never touches the data
    from sasrec_jax.config import TrainConfig

    res: dict = {"rss_mb": {"at_start_peak": peak_rss_mb()}}
    df, res["generation_seconds"] = timed(generate, args.events, args.users, args.items, args.seed)
    res["frame_mb"] = df.memory_usage(index=True, deep=True).sum() / 2**20
    res["rss_mb"]["after_generation_peak"] = peak_rss_mb()
    res["rss_mb"]["after_generation_current"] = current_rss_mb()

    seqs, t_build = timed(data.from_interactions, df)
    split, t_split = timed(data.leave_one_out, seqs)
    windows = TrainConfig.train_windows  # what training uses by default
    (inputs, targets), t_rows = timed(split.train.training_rows, args.max_len, windows)
    res["train_windows"] = windows
    res["ours_seconds"] = {
        "from_interactions": t_build,
        "leave_one_out": t_split,
        "training_rows": t_rows,
        "total": t_build + t_split + t_rows,
    }
    res["rss_mb"]["after_pipeline_peak"] = peak_rss_mb()
    res["rss_mb"]["after_pipeline_current"] = current_rss_mb()
    res["rss_mb"]["pipeline_increment_peak"] = (
        res["rss_mb"]["after_pipeline_peak"] - res["rss_mb"]["after_generation_peak"]
    )
    res["data"] = {
        **seqs.stats(),
        "train_rows": int(len(split.train)),
        "eval_users": int(len(split.test)),
        "training_rows_shape": list(inputs.shape),
        "training_rows_mb": (inputs.nbytes + targets.nbytes) / 2**20,
    }
    del inputs, targets, split  # the naive baseline must not run next to our padded arrays

    if not args.skip_naive:
        lists, t_naive = timed(naive, df)
        res["naive"] = {
            "compared": "naive sort_values+groupby.apply(list) vs ours data.from_interactions only",
            "naive_seconds": t_naive,
            "ours_seconds": t_build,
            "ratio_naive_over_ours": t_naive / t_build,
            "sampled_users_identical": same_sequences(seqs, lists, CHECK_USERS, args.seed),
        }
    return res


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def summarize(args: argparse.Namespace, res: dict, machine: dict) -> dict:
    peak = res["rss_mb"]["after_pipeline_peak"]
    total = res["ours_seconds"]["total"]
    return {
        "config": {k: getattr(args, k) for k in ("events", "users", "items", "seed", "max_len", "skip_naive")},
        "machine": machine,
        **res,
        "targets": {
            "seconds": TARGET_SECONDS,
            "peak_rss_mb": TARGET_PEAK_RSS_MB,
            "seconds_met": total <= TARGET_SECONDS,
            # the peak includes the DataFrame the pipeline reads: a caller has to hold it too
            "peak_rss_met": peak <= TARGET_PEAK_RSS_MB,
        },
    }


def markdown(summary: dict) -> str:
    s, r, t = summary["ours_seconds"], summary["rss_mb"], summary["targets"]
    rows = [
        ("generation (not counted)", f"{summary['generation_seconds']:.2f} s"),
        ("from_interactions", f"{s['from_interactions']:.2f} s"),
        ("leave_one_out", f"{s['leave_one_out']:.3f} s"),
        (
            f"train.training_rows({summary['config']['max_len']}, {summary['train_windows']!r})",
            f"{s['training_rows']:.2f} s",
        ),
        ("**pipeline total**", f"**{s['total']:.2f} s** (target ≤ {t['seconds']:.0f} s: {_ok(t['seconds_met'])})"),
        ("peak RSS after generation", f"{r['after_generation_peak']:.0f} MB"),
        (
            "peak RSS at end of pipeline",
            f"**{r['after_pipeline_peak']:.0f} MB** (target ≤ {t['peak_rss_mb']:.0f} MB: {_ok(t['peak_rss_met'])})",
        ),
        ("pipeline's own peak increment", f"{r['pipeline_increment_peak']:.0f} MB"),
    ]
    if "naive" in summary:
        n = summary["naive"]
        rows += [
            ("naive sort_values+groupby.apply(list)", f"{n['naive_seconds']:.2f} s"),
            ("ratio naive / from_interactions", f"{n['ratio_naive_over_ours']:.1f}×"),
        ]
    lines = ["| stage | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def _ok(met: bool) -> str:
    return "met" if met else "NOT met"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()  # load average before the child starts: a busy machine inflates the timings
    # spawn, not fork: a forked child would inherit (and count in ru_maxrss) whatever the parent holds
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        res = pool.submit(run_child, args).result()
    summary = summarize(args, res, machine)
    print(json.dumps(summary, indent=2))
    print()
    print(markdown(summary))


if __name__ == "__main__":
    main()
