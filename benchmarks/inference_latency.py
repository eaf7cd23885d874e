"""Single-session top-10 latency and batch throughput: exported ONNX graph in onnxruntime vs jitted JAX.

    python benchmarks/inference_latency.py --run runs/ml1m --bundle bundles/ml1m [--threads 1]

Prints one JSON object, then a markdown table. Both engines get the same number of threads (XLA's CPU client
is limited through XLA_FLAGS before JAX is imported). Timings on a shared 2-core machine are noisy: compare
ratios from one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (the JAX model)")
    p.add_argument("--bundle", required=True, help="bundle exported from that run (the ONNX model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=300, help="timed calls per case")
    p.add_argument("--lengths", default="200,10", help="session lengths to time")
    p.add_argument("--batch", type=int, default=64)
    return p.parse_args()


def timed(fn, repeats: int, warmup: int = 20) -> dict:
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    return {
        "median_ms": float(np.median(times) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "mean_ms": float(times.mean() * 1e3),
    }


def main() -> None:
    args = parse_args()
    # one-thread XLA must be configured before jax is imported
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    import jax
    import onnxruntime as ort

    from sasrec_jax import SASRec
    from sasrec_jax.train import merge

    est = SASRec.load(args.run)
    module = merge(est._graphdef, jax.device_put(est._params))
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    L, V = manifest["max_len"], manifest["num_items"]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(Path(args.bundle) / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    @jax.jit
    def jax_top10(seq):
        return jax.lax.top_k(module(seq), 10)[1]

    def ort_top10(seq):
        scores = sess.run(["scores"], {"item_ids": seq})[0]
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)

    rng = np.random.default_rng(0)
    cases = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        seq = np.zeros((1, L), np.int32)
        seq[0, L - min(n, L) :] = rng.integers(1, V + 1, size=min(n, L))
        assert (ort_top10(seq) == np.asarray(jax_top10(seq))).all(), "engines disagree on top-10"
        cases[f"single_len{n}"] = {
            "onnxruntime": timed(lambda seq=seq: ort_top10(seq), args.repeats),
            "jax_jit": timed(lambda seq=seq: np.asarray(jax_top10(seq)), args.repeats),
        }
    batch = np.zeros((args.batch, L), np.int32)
    for r in range(args.batch):
        n = int(rng.integers(1, L + 1))
        batch[r, L - n :] = rng.integers(1, V + 1, size=n)
    b_ort = timed(lambda: ort_top10(batch), max(20, args.repeats // 10), warmup=3)
    b_jax = timed(lambda: np.asarray(jax_top10(batch)), max(20, args.repeats // 10), warmup=3)
    cases[f"batch{args.batch}"] = {
        "onnxruntime": {**b_ort, "sessions_per_s": args.batch / (b_ort["median_ms"] / 1e3)},
        "jax_jit": {**b_jax, "sessions_per_s": args.batch / (b_jax["median_ms"] / 1e3)},
    }
    result = {
        "model": {"num_items": V, "max_len": L, "dim": manifest["dim"], "run": args.run, "bundle": args.bundle},
        "threads": args.threads,
        "cases": cases,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    print(json.dumps(result, indent=2))
    print()
    print("| case | onnxruntime median / p99 (ms) | JAX jit median / p99 (ms) | ORT speed-up |")
    print("|---|---|---|---|")
    for name, c in cases.items():
        o, j = c["onnxruntime"], c["jax_jit"]
        extra = f" ({o['sessions_per_s']:.0f} vs {j['sessions_per_s']:.0f} sessions/s)" if "sessions_per_s" in o else ""
        print(
            f"| {name} | {o['median_ms']:.2f} / {o['p99_ms']:.2f} | {j['median_ms']:.2f} / {j['p99_ms']:.2f} | "
            f"{j['median_ms'] / o['median_ms']:.2f}x{extra} |"
        )


if __name__ == "__main__":
    main()
