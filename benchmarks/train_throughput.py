"""Training throughput of the ML-1M recipe per loss: steady-state step time, sequences/s, tokens/s, compile time.

    SASREC_DATA_DIR=../shared/data python benchmarks/train_throughput.py [--steps 60] [--length-buckets 3]

Runs the library's own jitted train step (train.make_train_step) on real ML-1M batches as `fit` builds them
(batch 128, L 200, whole-history windows; `--length-buckets` as given, else the library default), with the
default model, for each loss: full softmax CE over all 3,416 items (the default), sampled softmax with shared
negatives, and the paper's BCE with one negative per position; plus CE without dropout (what the dropout masks
cost) and CE with the other batching: length-bucketed (3 widths: batches of short sequences cut to L/2 or
L/4) when the others run at full width, else full width. "tokens" are the positions that carry a target
(real items, not padding): tokens/s compares setups whose batches differ in width. A step that compiled a new
shape is not timed; the number of compiled shapes is reported (length × position buckets keep it small).
Prints one JSON object, then a markdown table.
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


def setups() -> dict[str, tuple[dict, dict]]:
    """name -> (TrainConfig overrides, ModelConfig overrides)."""
    return {
        "ce": ({"loss": "ce"}, {}),
        "sampled (512 negatives)": ({"loss": "sampled", "negatives": 512}, {}),
        "bce (1 negative)": ({"loss": "bce"}, {}),
        "ce, no dropout": ({"loss": "ce"}, {"dropout": 0.0}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="steps per setup; those that compiled are not timed")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len", type=int, default=200)
    args = p.parse_args()
    root = os.environ.get("SASREC_DATA_DIR")
    if not root:
        sys.exit("SASREC_DATA_DIR is not set: point it at the directory holding ml-1m/")

    import jax

    from sasrec_jax import data, movielens, train
    from sasrec_jax.batches import Batcher
    from sasrec_jax.config import ModelConfig, TrainConfig

    seqs = data.from_interactions(movielens.read_sasrec_txt(Path(root) / "ml-1m" / "ml-1m.txt.gz"))
    split = data.leave_one_out(seqs)
    inputs, targets = split.train.training_rows(args.max_len, TrainConfig.train_windows)
    epoch_tokens = int((targets != 0).sum())  # 0 = PAD
    placement = train.Placement.create()
    results = {}
    for name, (train_kw, model_kw) in setups().items():
        mc = ModelConfig(num_items=seqs.vocab.size, max_len=args.max_len, **model_kw)
        tc = TrainConfig(batch_size=args.batch_size, **train_kw)
        graphdef, params = train.init_model(mc, 0)
        tx = train.build_optimizer(tc, 48)
        opt_state = tx.init(params)
        params, opt_state = placement.replicate(params), placement.replicate(opt_state)
        step = train.make_train_step(graphdef, tx, tc)
        batcher = Batcher.create(inputs, targets, args.batch_size)
        batches = batcher.batches(0, 1)
        first = placement.put_batch(next(batches))
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, first, 0, 0, np.float32(1.0))
        loss.block_until_ready()
        compile_s = time.perf_counter() - t0
        times, seqs_done, tokens, epoch = [], 0, 0, 1
        for i in range(args.steps):
            try:
                b = next(batches)
            except StopIteration:
                epoch += 1
                batches = batcher.batches(0, epoch)
                b = next(batches)
            dev = placement.put_batch(b)
            shapes = step._cache_size()
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, dev, i + 1, 0, np.float32(1.0))
            loss.block_until_ready()
            if step._cache_size() == shapes:  # steps that compiled a new shape are not timed
                times.append(time.perf_counter() - t0)
                seqs_done += b.num_sequences
                tokens += int(b.weight_SxN.sum())
        total = sum(times)
        results[name] = {
            "step_ms_median": float(np.median(times) * 1e3),
            "step_ms_p90": float(np.percentile(times, 90) * 1e3),
            "sequences_per_s": seqs_done / total,
            "tokens_per_s": tokens / total,
            "compile_plus_first_step_s": round(compile_s, 2),
            "compiled_shapes": step._cache_size(),
            "timed_steps": len(times),
            "epoch_s_estimate": epoch_tokens / (tokens / total),
        }
        print(f"{name}: {results[name]['step_ms_median']:.0f} ms/step", file=sys.stderr, flush=True)
    out = {
        "data": {
            "training_rows": len(inputs),
            "epoch_tokens": epoch_tokens,
            "items": seqs.vocab.size,
            "batch_size": args.batch_size,
            "max_len": args.max_len,
        },
        "steps": args.steps,
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(),
            "jax": jax.__version__,
        },  # fmt: skip
    }
    print(json.dumps(out, indent=2))
    print()
    base = results["ce"]["tokens_per_s"]
    print(
        "| loss | step median / p90 (ms) | sequences/s | tokens/s | epoch (s) | compile + 1st step (s) | shapes "
        "| tokens/s vs ce |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['step_ms_median']:.0f} / {r['step_ms_p90']:.0f} | {r['sequences_per_s']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['epoch_s_estimate']:.0f} | {r['compile_plus_first_step_s']:.1f} | "
            f"{r['compiled_shapes']} | {r['tokens_per_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
