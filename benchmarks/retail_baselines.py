"""The sparse retail-shaped generator's shape and baselines: what docs/data.md states about `--format retail`.

    python benchmarks/retail_baselines.py [--seed 0] [--test-users 10000]

Generates the default `sasrec_jax.retail` log, describes it (users, items, events, lengths) and ranks a seeded sample
of leave-one-out test users against the full catalogue with the random, popular and first-order Markov baselines
(the library's own scorers and ranking). Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sasrec_jax import data, evaluate
from sasrec_jax.retail import generate_retail

# A real sparse retail log of this shape (40k users, 54.5k items, 8.8 events per user): Markov's test NDCG@10
# under the same protocol, measured by an independent evaluator (issue 21).
REAL_MARKOV_NDCG10 = 0.0286


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-users", type=int, default=10_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    df = generate_retail(seed=args.seed)
    generate_s = time.perf_counter() - t0
    seqs = data.from_interactions(df, user_col="user_id", item_col="item_id", time_col="timestamp")
    lengths = seqs.lengths
    split = data.leave_one_out(seqs)
    V = seqs.vocab.size
    test = split.test.take(evaluate.sample_rows(len(split.test), args.test_users, 0))
    baselines = {}
    for name, fn in evaluate.baseline_scorers(split.train, V).items():
        r = evaluate.rank(fn, test, V, 50, batch_size=256).summary(V)
        baselines[name] = {"NDCG@10": round(r["NDCG@10"], 4), "HR@10": round(r["HR@10"], 4)}
    out = {
        "seed": args.seed,
        "users": int(seqs.num_users),
        "items": int(V),
        "events": int(seqs.num_events),
        "mean_length": round(float(lengths.mean()), 2),
        "median_length": float(np.median(lengths)),
        "p99_length": float(np.percentile(lengths, 99)),
        "test_users_ranked": len(test),
        "generate_seconds": round(generate_s, 1),
        "baselines": baselines,
        "real_log_markov_ndcg@10": REAL_MARKOV_NDCG10,
    }
    print(json.dumps(out, indent=2))
    print(
        f"\n{out['users']:,} users, {out['items']:,} items, {out['events']:,} events; length mean "
        f"{out['mean_length']}, median {out['median_length']:.0f}, p99 {out['p99_length']:.0f}\n"
    )
    print("| baseline | NDCG@10 | HR@10 |\n|---|---|---|")
    for name, m in baselines.items():
        print(f"| {name} | {m['NDCG@10']:.4f} | {m['HR@10']:.4f} |")
    print(f"| Markov on the real log of this shape | {REAL_MARKOV_NDCG10:.4f} | |")


if __name__ == "__main__":
    main()
