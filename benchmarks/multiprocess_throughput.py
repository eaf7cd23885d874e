"""Multi-process training on this machine, and what a checkpoint save costs the training loop.

    python benchmarks/multiprocess_throughput.py [--users 20000] [--items 20000] [--events 600000]
                                                 [--ckpt-items 316000] [--checkpoint-only]

1. Throughput: the same `SASRec.fit` (one epoch of a retail-shaped log from `benchmarks/seed_scale.py`, the
   `small` preset at L=50, global batch 128) as 1 process × 2 CPU devices and as 2 processes × 1 CPU device
   (jax.distributed on 127.0.0.1, gloo). Sequences/s are counted between the 10th and the last step, from the
   moment each step's loss reaches the host (`train._on_loss`), so compilation and validation are left out. On one
   machine with 2 cores both layouts share the same cores: the figure measures correctness and the overhead of
   the cross-process path (gloo all-reduce over loopback, the per-step agreement on stopping/saving), not a
   speed-up, which needs real hosts.
2. Checkpoint blocking time, at the users' scale (`large` preset shapes: 316k items, d=128, 3 blocks, FFN 512,
   AdamW + moving average): the seconds a save keeps the training loop from its next step, before (the msgpack
   writer sasrec-jax used before Orbax: serialise everything, write, fsync, rename, all on the loop's thread) and
   after (`checkpoint.Checkpoints.save_state`: Orbax's asynchronous save returns once the arrays are copied off
   the devices; the files are written in the background), with the time until the Orbax save is on disk, and
   how long after that its checksums (sha256 of every file, `checkpoint.record_checksums`) take on their
   background thread. The save itself also checks that the weights are finite and that the disk has room.

Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 10


def worker(args) -> None:
    """One process of a throughput run: trains one epoch and (process 0) writes the step timings as JSON."""
    from sasrec_jax import distributed

    distributed.initialize(
        distributed.Settings(
            coordinator=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            local_devices=args.local_devices,
        )
    )
    import pandas as pd

    from sasrec_jax import SASRec, train

    times: dict[int, float] = {}
    train._on_loss = lambda step, _value: times.setdefault(step, time.perf_counter())
    df = pd.read_parquet(args.data)
    model = SASRec(
        preset="small",
        max_len=50,
        batch_size=128,
        epochs=1,
        valid_users=512,
        checkpoint_minutes=0,
        progress=False,
        verbose=False,
    )
    model.fit(df)
    if distributed.is_main():
        steps = sorted(times)
        # the last step's loss is read after the loop ends: stop at the one before it
        first, last = steps[WARMUP_STEPS], steps[-2]
        seconds = times[last] - times[first]
        Path(args.result).write_text(
            json.dumps({"steps": last - first, "seconds": seconds, "sequences_per_s": (last - first) * 128 / seconds})
        )


def launch(data: Path, procs: int, local_devices: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        port = 24000 + os.getpid() % 1000 + procs * 7 + local_devices
        popens = []
        for i in range(procs):
            cmd = [sys.executable, __file__, "--worker", "--data", str(data), "--result", str(result)]
            cmd += ["--local-devices", str(local_devices)]
            if procs > 1:
                cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(procs), "--process-id", str(i)]
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            popens.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for p in popens:
            _, err = p.communicate(timeout=3600)
            if p.returncode:
                raise SystemExit(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
        return json.loads(result.read_text())


def checkpoint_blocking(items: int, repeats: int = 3) -> dict:
    import jax
    import numpy as np
    from flax import serialization

    from sasrec_jax import checkpoint, files, train
    from sasrec_jax.config import PRESETS, ModelConfig, TrainConfig

    p = PRESETS["large"]
    mc = ModelConfig(num_items=items, max_len=200, dim=p.dim, num_blocks=p.num_blocks, ffn_dim=p.ffn_mult * p.dim)
    tc = TrainConfig(ema_decay=p.ema_decay)
    _, params = train.init_model(mc, 0)
    tx = train.build_optimizer(tc, 100)
    placement = train.Placement.create()
    params = placement.replicate(params)
    opt_state = placement.replicate(tx.init(params))
    size = sum(np.asarray(x).nbytes for x in jax.tree.leaves((params, opt_state)))
    meta = train.LoopState().to_meta()
    msgpack, orbax_block, orbax_total = [], [], []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()  # what checkpoint.save did before Orbax
            payload = {
                "format_version": 1,
                "params": jax.device_get(params),
                "opt_state": serialization.to_state_dict(jax.device_get(opt_state)),
                "meta": json.dumps(meta),
            }
            files.atomic_write_bytes(Path(tmp) / "last.msgpack", serialization.msgpack_serialize(payload))
            msgpack.append(time.perf_counter() - t0)
        ckpt = checkpoint.Checkpoints(Path(tmp) / "run")
        hashing = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ckpt.save_state(params, opt_state, meta)
            orbax_block.append(time.perf_counter() - t0)
            ckpt.state.wait_until_finished()
            orbax_total.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            ckpt.wait()  # + the checksums of the save, hashed on a background thread (not the loop's)
            hashing.append(time.perf_counter() - t1)
        ckpt.close()
    return {
        "items": items,
        "checkpoint_mb": round(size / 2**20, 1),
        "msgpack_blocking_s": round(statistics.median(msgpack), 3),
        "orbax_blocking_s": round(statistics.median(orbax_block), 3),
        "orbax_on_disk_s": round(statistics.median(orbax_total), 3),
        "checksums_after_s": round(statistics.median(hashing), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--ckpt-items", type=int, default=316_000)
    parser.add_argument("--checkpoint-only", action="store_true", help="only the checkpoint part")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local-devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from benchmarks.seed_scale import generate_log

    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "throughput": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint_only:
            return _print(out | {"checkpoint": checkpoint_blocking(args.ckpt_items)})
        data = Path(tmp) / "events.parquet"
        generate_log(args.users, args.items, args.events, seed=0).to_parquet(data)
        out["data"] = {"users": args.users, "items": args.items, "events": args.events}
        out["throughput"] = {
            "1 process × 2 devices": launch(data, 1, 2),
            "2 processes × 1 device": launch(data, 2, 1),
        }
    out["checkpoint"] = checkpoint_blocking(args.ckpt_items)
    _print(out)


def _print(out: dict) -> None:
    print(json.dumps(out, indent=2))
    if out["throughput"]:
        print()
        print("| layout | steps timed | sequences/s |")
        print("|---|---|---|")
        for name, r in out["throughput"].items():
            print(f"| {name} | {r['steps']} | {r['sequences_per_s']:.0f} |")
    c = out["checkpoint"]
    print()
    print(
        f"| checkpoint ({c['items']:,} items, {c['checkpoint_mb']:,} MB) | training blocked, s | on disk after, s "
        "| checksums written after, s |"
    )
    print("|---|---|---|---|")
    print(f"| msgpack (before) | {c['msgpack_blocking_s']:.3f} | {c['msgpack_blocking_s']:.3f} | — |")
    print(
        f"| Orbax async (now) | {c['orbax_blocking_s']:.3f} | {c['orbax_on_disk_s']:.3f} "
        f"| {c['checksums_after_s']:.3f} |"
    )


if __name__ == "__main__":
    main()
