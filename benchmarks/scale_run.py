"""Scale run: a 1M-item synthetic catalogue trained with sampled softmax; reports peak memory and step time.

    python benchmarks/scale_run.py [--items 1000000 --users 50000 --minutes 5]

Generates the synthetic session data set with a 1M-item catalogue, builds sequences and the leave-one-out
split with the library, and trains the default model (d=64, 2 blocks) with `loss="sampled"` (negatives shared
by the batch) through the library's jitted train step for a time budget. Then ranks the validation item of
2,000 users against the whole catalogue (history excluded), next to the most-popular baseline, to show the
model learned something at this scale. Peak memory is the process's maximum resident set size (RSS).
Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--eval-users", type=int, default=2000)
    args = p.parse_args()

    import jax

    from sasrec_jax import data, evaluate, synthetic, train
    from sasrec_jax.batches import Batcher
    from sasrec_jax.config import ModelConfig, TrainConfig

    t0 = time.perf_counter()
    events = synthetic.generate_sessions(n_items=args.items, n_users=args.users).events
    seqs = data.from_interactions(events)
    split = data.leave_one_out(seqs)
    inputs, targets = split.train.training_rows(args.max_len)
    data_s = time.perf_counter() - t0
    seen = seqs.vocab.size
    # the catalogue is all `--items`: items nobody interacted with yet still have rows in the table (cold items),
    # so the embedding table, the optimizer state and full ranking are all at catalogue size
    V = max(seen, args.items)
    print(f"data: {len(events):,} events, {seen:,} items seen, {len(inputs):,} rows in {data_s:.0f} s", file=sys.stderr)

    mc = ModelConfig(num_items=V, max_len=args.max_len)
    tc = TrainConfig(loss="sampled", negatives=args.negatives, batch_size=args.batch_size)
    placement = train.Placement.create()
    graphdef, params = train.init_model(mc, 0)
    steps_per_epoch = -(-len(inputs) // args.batch_size)
    tx = train.build_optimizer(tc, steps_per_epoch)
    opt_state = tx.init(params)
    params, opt_state = placement.replicate(params), placement.replicate(opt_state)
    step = train.make_train_step(graphdef, tx, tc)
    started, steps, times, epoch, losses = time.perf_counter(), 0, [], 0, []
    budget = args.minutes * 60
    while time.perf_counter() - started < budget:
        epoch += 1
        for b in Batcher.create(inputs, targets, args.batch_size).batches(0, epoch):
            t = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, placement.put_batch(b), steps, 0, np.float32(1.0))
            losses.append(float(loss))
            times.append(time.perf_counter() - t)
            steps += 1
            if time.perf_counter() - started > budget:
                break
    train_s = time.perf_counter() - started

    score_fn = train.make_scorer(graphdef, placement)(params)
    valid = split.valid.take(np.arange(min(args.eval_users, len(split.valid))))
    ranking = evaluate.rank(score_fn, valid, V, args.max_len, exclude_seen=True, batch_size=64)
    model_metrics = ranking.summary(V)
    pop_rank = evaluate.rank(evaluate.popular_scorer(split.train, V), valid, V, args.max_len, exclude_seen=True,
                             batch_size=64)  # fmt: skip
    popular = pop_rank.summary(V)
    out = {
        "items": V,
        "items_with_interactions": seen,
        "users": len(inputs),
        "events": len(events),
        "max_len": args.max_len,
        "negatives": args.negatives,
        "batch_size": args.batch_size,
        "parameters_mb": sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6,
        "steps": steps,
        "epochs_started": epoch,
        "train_seconds": round(train_s, 1),
        "step_ms_median": float(np.median(times[5:] if len(times) > 5 else times) * 1e3),
        "first_step_s": round(times[0], 2),
        "loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
        "valid_subset": {"users": len(valid), "model": model_metrics, "popular": popular},
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__},
    }
    print(json.dumps(out, indent=2))
    print()
    print(
        "| items | users | steps (epochs) | step median (ms) | peak RSS (GB) | "
        "valid HR@10 / NDCG@10 (2k users) | popular HR@10 / NDCG@10 |"
    )
    print("|---|---|---|---|---|---|---|")
    m, pop = model_metrics, popular
    print(
        f"| {V:,} | {len(inputs):,} | {steps} ({epoch}) | {out['step_ms_median']:.0f} | {out['peak_rss_gb']} | "
        f"{m['HR@10']:.4f} / {m['NDCG@10']:.4f} | {pop['HR@10']:.4f} / {pop['NDCG@10']:.4f} |"
    )


if __name__ == "__main__":
    main()
