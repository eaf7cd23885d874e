"""Single-session top-10 latency and batch throughput: exported ONNX graphs in onnxruntime vs jitted JAX,
for a trained model, then for synthetic 100k- and 1M-item catalogues.

    python benchmarks/inference_latency.py --run runs/ml1m --bundle bundles/ml1m --threads 1

Trained model: the full-window graph (model.onnx), the smallest window graph that fits the session (what
sasrec_serve.Predictor runs), and the jitted JAX forward pass, all with top-10 in the timing. Synthetic catalogues
(random weights, same architecture): float32 scores + top-10 against the int8 shortlist path (encoder graph
→ int8 approximate scores → top-S → exact float32 re-rank), with the share of sessions whose top-10 is
identical to the float32 one. Prints one JSON object, then markdown tables. Both engines get the same number
of threads (XLA's CPU client is limited through XLA_FLAGS before JAX is imported). Timings on a shared 2-core
machine are noisy: compare ratios from one run, not absolute figures across runs.
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
    p.add_argument("--catalogues", default="100000,1000000", help="synthetic catalogue sizes ('' to skip)")
    p.add_argument("--shortlist", type=int, default=256, help="int8 shortlist size S")
    p.add_argument("--agreement-sessions", type=int, default=1000)
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


def top10(scores_NxV1: np.ndarray) -> np.ndarray:
    top = np.argpartition(-scores_NxV1, 10, axis=1)[:, :10]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores_NxV1, top, 1), 1, kind="stable"), 1)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def random_session(rng, n: int, L: int, V: int) -> np.ndarray:
    seq = np.zeros((1, L), np.int32)
    seq[0, L - min(n, L) :] = rng.integers(1, V + 1, size=min(n, L))
    return seq


def trained_model(args, rng) -> tuple[dict, dict]:
    import jax
    from sasrec_serve import bundle as B

    from sasrec_jax import SASRec
    from sasrec_jax.train import merge

    est = SASRec.load(args.run)
    module = merge(est._graphdef, jax.device_put(est._params))
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    L, V = manifest["max_len"], manifest["num_items"]
    windows = B.windows(manifest)
    sessions = {w: ort_session(Path(args.bundle) / B.scores_graph(manifest, w), args.threads) for w in windows}
    jax_top10 = jax.jit(lambda seq: jax.lax.top_k(module(seq), 10)[1])

    def windowed(seq):  # sasrec_serve.Predictor's choice: the smallest window that holds the session
        n = int((seq != 0).sum(axis=1).max())
        w = next(w for w in windows if w >= n)
        return top10(sessions[w].run(["scores"], {"item_ids": seq[:, L - w :]})[0])

    def full(seq):
        return top10(sessions[L].run(["scores"], {"item_ids": seq})[0])

    cases = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        seq = random_session(rng, n, L, V)
        assert (full(seq) == np.asarray(jax_top10(seq))).all(), "engines disagree on top-10"
        assert (windowed(seq) == full(seq)).all(), "window graph disagrees with the full graph"
        cases[f"single_len{n}"] = {
            "onnxruntime_window": timed(lambda seq=seq: windowed(seq), args.repeats),
            "onnxruntime_full": timed(lambda seq=seq: full(seq), args.repeats),
            "jax_jit": timed(lambda seq=seq: np.asarray(jax_top10(seq)), args.repeats),
        }
    batch = np.zeros((args.batch, L), np.int32)
    for r in range(args.batch):
        n = int(rng.integers(1, L + 1))
        batch[r, L - n :] = rng.integers(1, V + 1, size=n)
    reps = max(20, args.repeats // 10)
    b = {
        "onnxruntime_window": timed(lambda: windowed(batch), reps, warmup=3),
        "onnxruntime_full": timed(lambda: full(batch), reps, warmup=3),
        "jax_jit": timed(lambda: np.asarray(jax_top10(batch)), reps, warmup=3),
    }
    cases[f"batch{args.batch}"] = {
        k: {**v, "sessions_per_s": args.batch / (v["median_ms"] / 1e3)} for k, v in b.items()
    }
    model = {"num_items": V, "max_len": L, "dim": manifest["dim"], "windows": windows, "run": args.run,
             "bundle": args.bundle}  # fmt: skip
    return model, cases


def synthetic_catalogue(args, V: int, rng, tmp: Path) -> dict:
    """Random weights, the ML-1M architecture, V items: float32 scores graph vs the int8 shortlist path."""
    import jax
    import onnx
    from sasrec_export.bundle import _convert
    from sasrec_export.shortlist import build_shortlist_graph
    from sasrec_serve.shortlist import ShortlistScorer

    from sasrec_jax.config import ModelConfig
    from sasrec_jax.train import init_model, merge

    L = 200
    graphdef, params = init_model(ModelConfig(num_items=V, max_len=L, dim=64, num_blocks=2, num_heads=1), 0)
    module = merge(graphdef, jax.device_put(params))
    t0 = time.perf_counter()
    _convert(lambda s: module(s), L, tmp / f"scores_{V}.onnx", "scores", 23)
    for w in (16, L):
        _convert(lambda s: module.encode(s), w, tmp / f"encoder_{V}_L{w}.onnx", "session_embedding", 23)
    table = np.asarray(module.item_table(), np.float32)
    onnx.save(build_shortlist_graph(table, args.shortlist), str(tmp / f"shortlist_{V}.onnx"),
              save_as_external_data=True, location=f"shortlist_{V}.onnx.data")  # fmt: skip
    export_s = time.perf_counter() - t0
    scores_sess = ort_session(tmp / f"scores_{V}.onnx", args.threads)
    enc = {w: ort_session(tmp / f"encoder_{V}_L{w}.onnx", args.threads) for w in (16, L)}
    scorer = ShortlistScorer(ort_session(tmp / f"shortlist_{V}.onnx", args.threads), table)

    def float32_top10(seq):
        return top10(scores_sess.run(["scores"], {"item_ids": seq})[0])

    def int8_top10(seq):
        n = int((seq != 0).sum())
        w = 16 if n <= 16 else L
        h = enc[w].run(["session_embedding"], {"item_ids": seq[:, L - w :]})[0]
        return scorer.top_k(h, 10)[0]

    # agreement with the exact float32 top-10 (padding excluded) on sessions of every length
    n_check = args.agreement_sessions
    lengths = rng.integers(1, L + 1, size=n_check)
    seqs = np.concatenate([random_session(rng, int(n), L, V) for n in lengths])
    h_NxD = np.concatenate([enc[L].run(["session_embedding"], {"item_ids": seqs[i : i + 100]})[0]
                            for i in range(0, n_check, 100)])  # fmt: skip
    same = 0
    for i in range(0, n_check, 50):
        exact = h_NxD[i : i + 50] @ table.T
        exact[:, 0] = -np.inf
        got = scorer.top_k(h_NxD[i : i + 50], 10)[0]
        same += int((top10(exact) == got).all(axis=1).sum())
    cases = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        seq = random_session(rng, n, L, V)
        reps = max(30, args.repeats // 5)
        cases[f"single_len{n}"] = {
            "float32_scores": timed(lambda seq=seq: float32_top10(seq), reps, warmup=5),
            "int8_shortlist": timed(lambda seq=seq: int8_top10(seq), reps, warmup=5),
        }
    return {
        "num_items": V,
        "shortlist": args.shortlist,
        "top10_identical": same / n_check,
        "agreement_sessions": n_check,
        "table_mb": {"float32": table.nbytes / 1e6, "int8": table.size / 1e6},
        "export_seconds": round(export_s, 1),
        "cases": cases,
    }


def main() -> None:
    args = parse_args()
    # one-thread XLA must be configured before jax is imported
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    import tempfile

    import jax
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model, cases = trained_model(args, rng)
    catalogues = {}
    with tempfile.TemporaryDirectory() as tmp:
        for V in [int(x) for x in args.catalogues.split(",") if x.strip()]:
            catalogues[str(V)] = synthetic_catalogue(args, V, rng, Path(tmp))
    result = {
        "model": model,
        "threads": args.threads,
        "cases": cases,
        "catalogues": catalogues,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "onnxruntime": ort.__version__,
        },  # fmt: skip
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"Trained model ({model['num_items']} items, L={model['max_len']}, windows {model['windows']}), "
          f"top-10 included, {args.threads} thread(s), median / p99 ms:")  # fmt: skip
    print()
    print("| case | ORT, smallest window | ORT, full window | JAX jit | JAX / ORT window |")
    print("|---|---|---|---|---|")
    for name, c in cases.items():
        o, f, j = c["onnxruntime_window"], c["onnxruntime_full"], c["jax_jit"]
        extra = (f" ({o['sessions_per_s']:.0f} / {f['sessions_per_s']:.0f} / {j['sessions_per_s']:.0f} sessions/s)"
                 if "sessions_per_s" in o else "")  # fmt: skip
        print(
            f"| {name} | {o['median_ms']:.2f} / {o['p99_ms']:.2f} | {f['median_ms']:.2f} / {f['p99_ms']:.2f} | "
            f"{j['median_ms']:.2f} / {j['p99_ms']:.2f} | {j['median_ms'] / o['median_ms']:.2f}x{extra} |"
        )
    if catalogues:
        print()
        print(
            f"Synthetic catalogues (random weights, L=200, d=64), int8 shortlist S={args.shortlist}, median / p99 ms:"
        )
        print()
        print(
            "| items | case | float32 scores + top-10 | int8 shortlist + exact re-rank | speed-up | top-10 identical |"
        )
        print("|---|---|---|---|---|---|")
        for V, c in catalogues.items():
            for name, t in c["cases"].items():
                f, q = t["float32_scores"], t["int8_shortlist"]
                print(
                    f"| {int(V):,} | {name} | {f['median_ms']:.2f} / {f['p99_ms']:.2f} | "
                    f"{q['median_ms']:.2f} / {q['p99_ms']:.2f} | {f['median_ms'] / q['median_ms']:.1f}x | "
                    f"{c['top10_identical']:.1%} of {c['agreement_sessions']} |"
                )


if __name__ == "__main__":
    main()
