"""Full-softmax cross-entropy, one-shot logits against the chunked log-sum-exp: time and peak memory per step.

    python benchmarks/chunked_ce.py [--items 3416,50000,316000,1000000] [--positions 2048] [--dim 128]

For each catalogue size and each path (`one-shot`: the [N, V] logits at once, as before; `chunked`: blocks of
items with a recomputing backward pass, `sasrec_jax.losses.chunked_logsumexp`) a fresh process times the jitted
value-and-gradient of `losses.full_softmax_ce` with respect to the hidden states and the item table (the part of a
train step that grows with the catalogue) and reports its peak RSS. Each process runs under an address-space limit
(`--limit-gb`, default 12: the users' notebook machine), so a path that cannot fit fails with XLA's own
RESOURCE_EXHAUSTED instead of swapping. Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(items: int, positions: int, dim: int, mode: str, reps: int) -> dict:
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sasrec_jax import losses

    keys = jax.random.split(jax.random.key(0), 3)
    h_NxD = jax.random.normal(keys[0], (positions, dim), jnp.float32)
    table_VxD = jax.random.normal(keys[1], (items + 1, dim), jnp.float32) * 0.05
    t_N = jax.random.randint(keys[2], (positions,), 1, items + 1)
    w_N = jnp.ones((positions,), jnp.float32)
    chunk = 0 if mode == "one-shot" else losses.ce_chunk_size(positions, items + 1) or (1 << 23) // positions
    grad = jax.jit(jax.value_and_grad(lambda h, t: losses.full_softmax_ce(h, t, t_N, w_N, chunk=chunk), argnums=(0, 1)))
    t0 = time.perf_counter()
    out = grad(h_NxD, table_VxD)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(h_NxD, table_VxD))
        times.append(time.perf_counter() - t0)
    return {
        "loss": float(out[0]),
        "chunk": chunk,
        "compile_and_first_s": round(first, 2),
        "step_ms_median": round(float(np.median(times)) * 1e3, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }


def run_one(items: int, positions: int, dim: int, mode: str, reps: int, limit_gb: float) -> dict:
    code = (
        "import json, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * 1024**3)}, {int(limit_gb * 1024**3)})); "
        f"sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
        "from chunked_ce import child; "
        f"print(json.dumps(child({items}, {positions}, {dim}, {mode!r}, {reps})))"
    )
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}
    err = proc.stderr.strip().splitlines()
    reason = next((line for line in reversed(err) if "RESOURCE_EXHAUSTED" in line or "MemoryError" in line), None)
    return {"ok": False, "error": (reason or (err[-1] if err else f"exit {proc.returncode}"))[:300]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", default="3416,50000,316000,1000000")
    p.add_argument("--positions", type=int, default=2048, help="N: real target positions in one step")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--limit-gb", type=float, default=12.0)
    args = p.parse_args()
    rows = []
    for items in [int(v) for v in args.items.split(",")]:
        for mode in ("one-shot", "chunked"):
            r = run_one(items, args.positions, args.dim, mode, args.reps, args.limit_gb)
            rows.append({"items": items, "mode": mode, **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    import jax

    out = {
        "positions": args.positions,
        "dim": args.dim,
        "limit_gb": args.limit_gb,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__},
    }
    print(json.dumps(out, indent=2))
    print()
    print(f"N = {args.positions:,} positions, d = {args.dim}, address space limited to {args.limit_gb:g} GB\n")
    print("| items | one-shot step (ms) | one-shot peak RSS (GB) | chunked step (ms) | chunked peak RSS (GB) | chunk |")
    print("|---|---|---|---|---|---|")
    by = {(r["items"], r["mode"]): r for r in rows}
    for items in dict.fromkeys(r["items"] for r in rows):
        a, b = by[(items, "one-shot")], by[(items, "chunked")]

        def cell(r, key):
            return f"{r[key]:,}" if r["ok"] else "out of memory" if "RESOURCE" in r["error"] else "failed"

        print(
            f"| {items:,} | {cell(a, 'step_ms_median')} | {cell(a, 'peak_rss_gb')} | {cell(b, 'step_ms_median')} | "
            f"{cell(b, 'peak_rss_gb')} | {b.get('chunk', '')} |"
        )


if __name__ == "__main__":
    main()
