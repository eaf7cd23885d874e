"""Serving latency: in-process `Predictor.recommend`, then the HTTP service under concurrent clients, then the same
while the model is reloaded back to back, then while 40 concurrent reload requests hammer /admin/reload (reloads
are serialised: one runs, the others get 409 at once, so they must not take throughput from the clients).

    python benchmarks/serve_latency.py --bundle bundles/ml1m [--seconds 30] [--clients 16] [--workers 1]

The service runs as `python -m sasrec_serve --admin-token <random>` in its own process on 127.0.0.1; clients are threads
of this process with one keep-alive connection each. Sessions are random catalogue items of random length 1..L
(seeded). Prints one JSON object, then a markdown table; exits 1 if a recommendation failed or a reload got
anything but 200 or (when concurrent) 409. On a shared 2-core machine the client threads compete with the server
for the cores: compare runs made on the same machine, not absolute figures across machines.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sasrec_serve import Predictor  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle directory (sasrec-jax export)")
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each HTTP phase")
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2000, help="timed in-process calls")
    p.add_argument("--concurrent-reloads", type=int, default=40, help="reload requests sent at once, in waves")
    return p.parse_args()


def sessions(pred: Predictor, n: int, seed: int = 0) -> list[list]:
    rng = np.random.default_rng(seed)
    ids = pred.vocab.ids
    return [[ids[j] for j in rng.integers(0, len(ids), size=rng.integers(1, pred.max_len + 1))] for _ in range(n)]


def summary(latencies_s: list[float], seconds: float | None = None, errors: int = 0) -> dict:
    t = np.asarray(latencies_s) * 1e3
    out = {"requests": len(t), "median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
           "max_ms": float(t.max()), "errors": errors}  # fmt: skip
    if seconds:
        out["requests_per_s"] = len(t) / seconds
    return out


def in_process(pred: Predictor, queries: list[list], k: int, repeats: int) -> dict:
    for q in queries[:50]:
        pred.recommend(q, k=k)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pred.recommend(queries[i % len(queries)], k=k)
        times.append(time.perf_counter() - t0)
    return summary(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, token: str | None = None
) -> tuple[int, bytes]:
    headers = {"content-type": "application/json", **({"x-admin-token": token} if token else {})}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def load_phase(
    port: int, bodies: list[bytes], clients: int, seconds: float, reload_bundle: str | None = None,
    reloaders: int = 0, token: str | None = None,
) -> dict:  # fmt: skip
    """`clients` threads POST /v1/recommend for `seconds`. With `reloaders` = 1, one more thread reloads
    `reload_bundle` back to back; with more, that many threads send their reload requests together, wave after
    wave (each wave: every thread sends one, then waits for the others), so `reloaders` reloads are in flight at
    every wave's start."""
    latencies, errors, lock = [], [], threading.Lock()
    stop = threading.Event()
    reloads = []
    waves = threading.Barrier(reloaders) if reloaders > 1 else None

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad, i = [], [], c
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status, data = request(conn, "POST", "/v1/recommend", bodies[i % len(bodies)])
                if status != 200:
                    bad.append(f"{status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                bad.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t0)
            i += clients
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    def reloader():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({"bundle": reload_bundle}).encode()
        allowed = {200, 409} if waves else {200}  # 409: another reload was running, as it must be in a wave
        while not stop.is_set():
            if waves:
                try:
                    waves.wait(timeout=120)
                except threading.BrokenBarrierError:
                    break
            t0 = time.perf_counter()
            status, data = request(conn, "POST", "/admin/reload", body, token)
            with lock:
                reloads.append((status, time.perf_counter() - t0))
                if status not in allowed:
                    errors.append(f"reload {status}: {data[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    threads += [threading.Thread(target=reloader) for _ in range(reloaders)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    if waves:
        waves.abort()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    out = summary(latencies, elapsed, len(errors))
    if errors:
        out["first_errors"] = errors[:5]
    if reloaders:
        ok = [d for s, d in reloads if s == 200]
        out["reloads"] = len(ok)
        out["reloads_409"] = sum(s == 409 for s, _ in reloads)
        out["reload_median_s"] = float(np.median(ok)) if ok else None
        if waves:
            busy = [d for s, d in reloads if s == 409]
            out["reload_409_median_ms"] = float(np.median(busy) * 1e3) if busy else None
    return out


def main() -> None:
    args = parse_args()
    bundle = str(Path(args.bundle).resolve())
    pred = Predictor.load(bundle, threads=1)
    queries = sessions(pred, 1000)
    result = {
        "bundle": {
            "path": bundle,
            "model": pred.sha,
            "num_items": pred.num_items,
            "max_len": pred.max_len,
            "dim": pred.dim,
        },  # fmt: skip
        "settings": {
            "k": args.k,
            "clients": args.clients,
            "seconds": args.seconds,
            "workers": args.workers,
            "session_lengths": f"uniform 1..{pred.max_len}",
        },  # fmt: skip
        "in_process_1_thread": in_process(pred, queries, args.k, args.repeats),
    }
    del pred

    port = free_port()
    token = secrets.token_hex(16)
    command = [sys.executable, "-m", "sasrec_serve", bundle, "--port", str(port), "--workers", str(args.workers)]
    server = subprocess.Popen(
        [*command, "--admin-token", token],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                if request(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server not ready after 60 s")
            time.sleep(0.1)
        bodies = [json.dumps({"items": q, "k": args.k}).encode() for q in queries]
        load_phase(port, bodies, args.clients, min(1.0, args.seconds), None)  # warm-up: connections, pools
        result["http"] = load_phase(port, bodies, args.clients, args.seconds)
        result["http_during_reloads"] = load_phase(port, bodies, args.clients, args.seconds, bundle, 1, token)
        result["http_during_concurrent_reloads"] = load_phase(
            port, bodies, args.clients, args.seconds, bundle, args.concurrent_reloads, token
        )
    finally:
        server.terminate()
        server.wait(30)
    import onnxruntime

    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "onnxruntime": onnxruntime.__version__}  # fmt: skip
    print(json.dumps(result, indent=2))
    print()
    print("| case | median ms | p99 ms | requests/s | errors | reloads: 200 / 409 |")
    print("|---|---|---|---|---|---|")
    r = result["in_process_1_thread"]
    print(f"| in-process `recommend`, 1 thread | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | — | — | — |")
    phases = (
        ("http", "HTTP"),
        ("http_during_reloads", "HTTP during back-to-back reloads"),
        ("http_during_concurrent_reloads", f"HTTP during waves of {args.concurrent_reloads} concurrent reloads"),
    )
    for key, name in phases:
        r = result[key]
        reloads = f"{r['reloads']} / {r['reloads_409']}" if "reloads" in r else "—"
        print(f"| {name}, {args.clients} clients | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['requests_per_s']:.0f} | {r['errors']} | {reloads} |")  # fmt: skip
    if any(result[key]["errors"] for key, _ in phases):
        sys.exit(1)


if __name__ == "__main__":
    main()
