"""`python -m sasrec_serve BUNDLE_DIR` (and `sasrec-jax serve`): checks the bundle, then runs uvicorn on the app."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sasrec_serve.bundle import BundleError

MIN_TOKEN_CHARS = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m sasrec_serve`; `sasrec-jax serve` adds these same ones to its subcommand."""
    p.add_argument("bundle_dir", help="bundle directory written by `sasrec-jax export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers", type=int, default=1, help="processes (/metrics sums them); SIGHUP to the parent reloads them"
    )
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per process")
    p.add_argument(
        "--admin-token",
        default=None,
        help=f"turns POST /admin/reload on, requiring this token (at least {MIN_TOKEN_CHARS} characters) in the "
        "X-Admin-Token header; default $SASREC_ADMIN_TOKEN; without a token the endpoint does not exist",
    )
    p.add_argument(
        "--bundle-root",
        default=None,
        help='directory under which /admin/reload may load {"bundle": DIR}; default $SASREC_SERVE_BUNDLE_ROOT, '
        "else the served bundle's parent directory",
    )
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send request headers (10)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a request body, else 408 (30)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="idle keep-alive connections close (5)")
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=256,
        help="connections + requests in progress per process beyond which requests get 503 (256)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts them)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sasrec-serve", description="Serve a sasrec-jax ONNX bundle over HTTP.")
    add_arguments(p)
    return p


def _options(args: argparse.Namespace):
    """(timeouts, admin token, bundle root) from the flags and environment, or the one-line error to print."""
    from sasrec_serve.app import ENV_ADMIN_TOKEN, ENV_BUNDLE_ROOT, Timeouts

    if args.workers < 1 or args.threads < 1:
        return "--workers and --threads must be at least 1"
    if args.limit_concurrency < 1:
        return "--limit-concurrency must be at least 1"
    try:
        timeouts = Timeouts(header=args.header_timeout, body=args.body_timeout, keep_alive=args.keep_alive_timeout)
    except ValueError:
        return "--header-timeout, --body-timeout and --keep-alive-timeout must be positive numbers of seconds"
    token = args.admin_token or os.environ.get(ENV_ADMIN_TOKEN) or None
    if token is not None:
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            return "the admin token must be valid UTF-8 text"
        if len(token) < MIN_TOKEN_CHARS:
            return f"the admin token must have at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`)"
    if not Path(args.bundle_dir).is_dir():
        return f"{args.bundle_dir}: no such directory"
    root = args.bundle_root or os.environ.get(ENV_BUNDLE_ROOT) or None
    if root is not None and not Path(root).is_dir():
        return f"--bundle-root {root}: no such directory"
    root = Path(root).resolve() if root else Path(args.bundle_dir).resolve().parent
    return timeouts, token, root


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sasrec_serve import app as service
    from sasrec_serve.predictor import Predictor

    options = _options(args)
    if isinstance(options, str):
        print(f"error: {options}", file=sys.stderr)
        return 2
    timeouts, token, root = options
    try:  # everything a worker will do, once, here: a bad bundle is one line, not a traceback per worker
        Predictor.load(args.bundle_dir, threads=1)
    except BundleError as e:
        raise BundleError(f"{args.bundle_dir}: {e}") from None
    if token and not _is_loopback(args.host):
        print(
            f"warning: {args.host} is not loopback: /admin/reload's X-Admin-Token crosses the network in clear text "
            "unless TLS terminates in front of this server",
            file=sys.stderr,
        )
    # every worker process builds its app from these (uvicorn needs an import string for --workers > 1)
    os.environ.update(
        {
            service.ENV_BUNDLE: os.path.abspath(args.bundle_dir),
            service.ENV_THREADS: str(args.threads),
            service.ENV_BUNDLE_ROOT: str(root),
            service.ENV_DOCS: "1" if args.docs else "",
            service.ENV_BODY_TIMEOUT: repr(timeouts.body),
        }
    )
    if token:
        os.environ[service.ENV_ADMIN_TOKEN] = token
    with _shared_metrics(args.workers):
        uvicorn.run(
            "sasrec_serve.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=args.access_log,
            **service.server_options(timeouts, args.limit_concurrency),
        )
    return 0


@contextmanager
def _shared_metrics(workers: int):
    """With several workers, a fresh private directory in PROMETHEUS_MULTIPROC_DIR while the server runs, removed
    after: each worker process then writes its metrics there and any worker's /metrics reports them all, rather than
    its own share (prometheus_client's multiprocess mode). The variable is set here, before uvicorn starts the
    workers, because the library reads it when a process imports it; the directory is new for each run, as the
    library's docs require, so counts from an earlier run never leak in."""
    from sasrec_serve.metrics import ENV_MULTIPROC_DIR

    if workers == 1:
        yield  # one process: in-memory metrics (or the operator's own PROMETHEUS_MULTIPROC_DIR)
        return
    before = os.environ.get(ENV_MULTIPROC_DIR)
    path = tempfile.mkdtemp(prefix="sasrec-serve-metrics-")
    os.environ[ENV_MULTIPROC_DIR] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_MULTIPROC_DIR, None)
        else:
            os.environ[ENV_MULTIPROC_DIR] = before
        shutil.rmtree(path, ignore_errors=True)


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
