"""Synthetic sessions under the LSTM session model's protocol: SASRec against Markov, popular and the published
LSTM+attention figures.

    python benchmarks/synthetic_sessions.py            # 20,000 users, 5,000 items, seed 0, 5-minute budget

Data: `sasrec_jax.synthetic.generate_sessions(n_users=--users, n_items=--items, seed=--seed)`, the generator's
defaults otherwise (what `sasrec-jax quickstart` trains on).

Protocol (the LSTM session model's): for a user sequence s1..sn every prefix is one example, (s1..st) -> s(t+1)
for t = 1..n-1. The examples are split uniformly at random (seeded): 20% test, and of the other 80% a 5% validation
subset; the rest trains. SASRec trains on all positions of a sequence at once, so the loss at a position whose
target is a validation or test example is masked (its target set to PAD, weight 0); the held-out items stay in
the *inputs* of later positions, exactly as later prefixes contain them in the LSTM protocol. The best epoch
(validation NDCG@10, same ranking protocol) is kept, with the library's early stopping and time budget.
Test: each test prefix (its last max_len items) is scored and the target ranked against *all* items; items of
the prefix are *not* excluded (repeats are legitimate in that protocol); ties count against the target.
Hit@K = share of targets ranked in the top K; MRR@20 = mean of 1/rank for ranks <= 20, else 0.

Baselines on the same test examples: most popular (target counts of the training examples) and first-order
Markov (transition counts prefix-last-item -> target of the training examples; popularity breaks ties and is the
fallback for an unseen last item). The LSTM+attention row is the published figure, a constant: it was not
re-run here, on data from that project's own generator of the same size.

Prints one JSON object, then a markdown table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from sasrec_jax import data
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.prefix_protocol import PUBLISHED_LSTM, run
from sasrec_jax.synthetic import generate_sessions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0, help="generator, example split and training seed")
    p.add_argument("--max-minutes", type=float, default=5.0, help="SASRec training budget (validation included)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="at most this many epochs")
    p.add_argument("--max-len", type=int, default=None, help="default: the library's p99 rule (auto_max_len)")
    p.add_argument("--dim", type=int, default=ModelConfig.dim, help="model width d")
    p.add_argument("--ffn-dim", type=int, default=ModelConfig.ffn_dim, help="feed-forward width (0: --dim)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    events = generate_sessions(n_users=args.users, n_items=args.items, seed=args.seed).events
    seqs = data.from_interactions(events)
    stats = seqs.stats()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    log(f"synthetic sessions: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} events")
    out = run(
        seqs,
        seed=args.seed,
        model_kw={"max_len": args.max_len, "dim": args.dim, "ffn_dim": args.ffn_dim},
        train_kw={"max_minutes": args.max_minutes, "epochs": args.epochs},
        progress=not args.no_progress,
        log=log,
    )
    out = {
        "benchmark": "synthetic_sessions",
        "protocol": "every prefix -> next item is an example; 80/20 random split (5% of the 80% validates); "
        "full ranking over all items, history not excluded, ties against the target",
        "data": {
            "generator": "sasrec_jax.synthetic.generate_sessions",
            "seed": args.seed,
            "requested_users": args.users,
            "requested_items": args.items,
            **stats,
        },
        **out,
        "published": {"LSTM+attention": PUBLISHED_LSTM},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    print(json.dumps(out, indent=2))
    print()
    print(
        f"Synthetic sessions: {stats['users']:,} users, {stats['items']:,} items; "
        f"{out['examples']['test']:,} test examples (prefix -> next item), full ranking, history not excluded."
    )
    print()
    print("| model | Hit@10 | Hit@20 | MRR@20 |")
    print("|---|---|---|---|")
    for name, r in out["results"].items():
        print(f"| {name} | {r['Hit@10']:.1%} | {r['Hit@20']:.1%} | {r['MRR@20']:.3f} |")
    p = PUBLISHED_LSTM
    print(f"| LSTM+attention (published) | {p['Hit@10']:.1%} | {p['Hit@20']:.1%} | {p['MRR@20']:.3f} |")
    t = out["training"]
    print()
    print(f"SASRec: {t['stopped']}; best epoch {t['best_epoch']} of {t['epochs']}; {t['seconds']:.0f} s of training.")


if __name__ == "__main__":
    main()
