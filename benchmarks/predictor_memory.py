"""Resident memory of sasrec_serve.Predictor for a large-catalogue bundle: after loading, after recommendations, and
after a call that needs the float32 scores graph.

    python benchmarks/predictor_memory.py [--items 1000000] [--bundle DIR]

Without `--bundle`, builds one first (cached under runs/bench/): a d=64, L=50 model over `--items` items,
trained for one epoch with sampled softmax on random sessions that together touch every item (2,000 users),
then exported with the defaults (`sasrec-jax export`: from 50,000 items on, the int8 shortlist graph and no
window graphs). The training is only there to make a real bundle; its accuracy is not the point.

Each measurement runs in a fresh process that imports only numpy, onnxruntime and `serve`, and reads its
resident set (VmRSS, split into anonymous and file-backed pages, from /proc/self/status, so Linux only)
after each stage: imports, `Predictor.load`, 200 single-session `recommend` calls (k=10, random sessions of
1..L known items), then one `score_items` call. Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> dict:
    status = Path("/proc/self/status")
    if not status.is_file():
        sys.exit("this benchmark reads /proc/self/status: it runs on Linux only")
    fields = {}
    for line in status.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB
    return {"rss": fields["VmRSS"], "anon": fields.get("RssAnon"), "file": fields.get("RssFile")}


def measure(bundle: Path, calls: int) -> dict:
    """Runs in its own process (see main): the stages' resident memory, and the graphs loaded at each."""
    import onnxruntime  # noqa: F401  (imported before the first reading, as a service would have it)
    from sasrec_serve import Predictor

    stages = [{"stage": "imports (numpy, onnxruntime, serve)", **rss_mib(), "graphs": []}]
    pred = Predictor.load(bundle)
    stages.append({"stage": "Predictor.load", **rss_mib(), "graphs": pred.loaded_graphs})
    rng = np.random.default_rng(0)
    ids = pred.vocab.ids
    for _ in range(calls):
        session = [ids[j] for j in rng.integers(0, len(ids), size=rng.integers(1, pred.max_len + 1))]
        pred.recommend(session, k=10)
    stages.append({"stage": f"+ {calls} recommend calls", **rss_mib(), "graphs": pred.loaded_graphs})
    pred.score_items([[ids[0], ids[1]]])
    stages.append({"stage": "+ 1 score_items call", **rss_mib(), "graphs": pred.loaded_graphs})
    return {"stages": stages, "num_items": pred.num_items, "dim": pred.dim, "max_len": pred.max_len}


def build_bundle(items: int, users: int, work: Path) -> Path:
    """A real bundle over `items` items: one epoch of sampled softmax on random sessions, then the export."""
    import pandas as pd
    from sasrec_export import export_bundle

    from sasrec_jax import SASRec

    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    per_user = -(-items // users)
    rng = np.random.default_rng(0)
    order = rng.permutation(users * per_user) % items + 1  # every item at least once, in random sessions
    events = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(users), per_user),
            "item_id": order,
            "timestamp": np.tile(np.arange(per_user), users),
        }
    )
    run = work / "run"
    model = SASRec(max_len=50, loss="sampled", negatives=1024, epochs=1, batch_size=256, verbose=True)
    model.fit(events, run_dir=run)  # fit saves the run there
    export_bundle(run, bundle, overwrite=True)
    return bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="an exported bundle (default: build one over --items items)")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--calls", type=int, default=200, help="recommend calls before the last reading")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "predictor_memory"))
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.calls)))
        return

    bundle = (
        Path(args.bundle) if args.bundle else build_bundle(args.items, args.users, Path(args.work) / str(args.items))
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(bundle), "--calls", str(args.calls)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    files = {name: round(f["bytes"] / 2**20, 1) for name, f in manifest["files"].items()}
    out = {
        "bundle": str(bundle),
        **result,
        "shortlist": manifest.get("shortlist"),
        "files_mib": files,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    try:
        import onnxruntime

        out["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    print(json.dumps(out, indent=2))
    print()
    base = result["stages"][0]["rss"]
    print(f"{result['num_items']:,} items, d={result['dim']}, L={result['max_len']}; float32 table "
          f"{files.get('item_embeddings.npy', 0):,} MiB, model.onnx {files.get('model.onnx', 0):,} MiB")  # fmt: skip
    print()
    print("| stage | RSS (MiB) | over imports (MiB) | anonymous / file-backed (MiB) | graphs in memory |")
    print("|---|---|---|---|---|")
    for s in result["stages"]:
        print(
            f"| {s['stage']} | {s['rss']:,.0f} | {s['rss'] - base:+,.0f} | {s['anon']:,.0f} / {s['file']:,.0f} | "
            f"{', '.join(s['graphs']) or '–'} |"
        )


if __name__ == "__main__":
    main()
