"""`python -m serve BUNDLE_DIR` (and `sasrec-jax serve`): checks the bundle, then runs uvicorn on the app."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from serve.bundle import BundleError, read_manifest, verify_checksums


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a sasrec-jax ONNX bundle over HTTP.")
    p.add_argument("bundle_dir", help="bundle directory written by `sasrec-jax export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes; SIGHUP to the parent reloads them all")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per process")
    p.add_argument("--admin-token", default=None, help="required as X-Admin-Token by /admin/reload")
    p.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts them)")
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from serve.app import ENV_ADMIN_TOKEN, ENV_BUNDLE, ENV_THREADS

    if args.workers < 1 or args.threads < 1:
        print("error: --workers and --threads must be at least 1", file=sys.stderr)
        return 2
    verify_checksums(args.bundle_dir, read_manifest(args.bundle_dir))  # fail here, not in every worker
    token = args.admin_token or os.environ.get(ENV_ADMIN_TOKEN)
    if not token and not _is_loopback(args.host):
        print(f"warning: {args.host} is not loopback and /admin/reload has no --admin-token", file=sys.stderr)
    # every worker process builds its app from these (uvicorn needs an import string for --workers > 1)
    os.environ.update({ENV_BUNDLE: os.path.abspath(args.bundle_dir), ENV_THREADS: str(args.threads)})
    if token:
        os.environ[ENV_ADMIN_TOKEN] = token
    uvicorn.run(
        "serve.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
    )
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
