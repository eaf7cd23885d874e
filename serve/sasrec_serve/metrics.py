"""Prometheus metrics (prometheus_client, multiprocess-aware) and the body guard (size limit, receive timeout), as
one thin ASGI middleware. Part of the HTTP app: prometheus_client comes with the `http` extra."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RELOAD_RESULTS = ("ok", "error", "busy")  # busy: refused (409) because another reload was running
# prometheus_client's switch to multiprocess mode: it must be set before the library is imported in a process,
# so `sasrec-serve --workers N` sets it before uvicorn starts the workers
ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Request counts by (path, method, status), a latency histogram by path, fallbacks, reloads and the model
    served, in a registry of their own (so any number of apps can live in one process).

    With PROMETHEUS_MULTIPROC_DIR set (`--workers N`), every worker writes its values to files in that directory
    and a scrape, whichever worker answers it, reports the sum over all workers, including those that have exited
    (counters never go back)."""

    def __init__(self, paths: set[str]):
        self.paths = paths  # anything else is counted as "other", so unknown URLs cannot grow the label set
        self.multiprocess_dir = os.environ.get(ENV_MULTIPROC_DIR) or None
        own = CollectorRegistry()
        self.requests = Counter(
            "sasrec_requests", "HTTP requests by path, method and status", ["path", "method", "status"], registry=own
        )
        self.latency = Histogram(
            "sasrec_request_seconds", "HTTP request latency by path", ["path"], buckets=LATENCY_BUCKETS, registry=own
        )
        self.fallbacks = Counter("sasrec_fallbacks", "answers from the popularity fallback", registry=own)
        self.reloads = Counter("sasrec_reloads", "model reloads by result", ["result"], registry=own)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)  # reported as 0 before the first reload
        # livemax over workers: 1 while a live worker serves that model (workers can differ after /admin/reload)
        self.model = Gauge("sasrec_model_info", "the model served (1)", ["model"], multiprocess_mode="livemax",
                           registry=own)  # fmt: skip
        if self.multiprocess_dir:
            # the library's docs: a registry holding only the collector, never the metrics themselves
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=self.multiprocess_dir)
        else:
            self.registry = own

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        path = path if path in self.paths else "other"
        method = method if method in METHODS else "other"  # any token is a valid HTTP method
        self.requests.labels(path, method, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def fallback(self, n: int = 1) -> None:
        self.fallbacks.inc(n)

    def reload(self, result: str) -> None:
        if result not in RELOAD_RESULTS:
            raise ValueError(f"reload result must be one of {RELOAD_RESULTS}, got {result!r}")
        self.reloads.labels(result).inc()

    def serving(self, model: str, previous: str | None = None) -> None:
        """`model` is now what this process serves, in place of `previous`."""
        if previous is not None and previous != model:
            if self.multiprocess_dir:
                self.model.labels(previous).set(0)  # multiprocess mode cannot remove a label
            else:
                self.model.remove(previous)
        self.model.labels(model).set(1)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type (the text format, or OpenMetrics when the Accept header asks)."""
        if self.multiprocess_dir:
            _forget_dead_workers(self.multiprocess_dir)
        try:
            encode, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):  # a version that is not a number ("version=abc") fails its comparison
            encode, content_type = choose_encoder("")  # the text format: a fine answer to any Accept
        return encode(self.registry), content_type

    def process_exit(self) -> None:
        """Called as a worker shuts down: its live gauges (the model it served) stop counting; its counters stay."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


def _forget_dead_workers(path: str) -> None:
    """mark_process_dead for workers that died without shutting down (killed, out of memory): the library's docs
    call it from the server's child-exit hook, which uvicorn does not have, so a scrape looks for live-gauge files
    whose process is gone (the files are named `gauge_live<mode>_<pid>.db`, the pattern mark_process_dead removes)."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = os.path.basename(name)[: -len(".db")].rsplit("_", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            multiprocess.mark_process_dead(int(pid), path)
        except PermissionError:  # exists, owned by someone else
            pass


class Guard:
    """ASGI middleware: refuses bodies over `max_body_bytes` with 413 (before the app parses anything, whether
    or not Content-Length is sent) and bodies not received within `body_timeout` seconds with 408 (a client that
    sends its headers, then a byte now and then, would hold a connection and a task for ever), and records every
    HTTP request in `metrics`. Both refusals close the connection, as the rest of the body is never read."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, body_timeout: float = 30.0):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500  # what the client gets if the app fails before starting a response

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, tuple):
                await _respond(send_and_record, *body)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect, as the server would

            await self.app(scope, replay, send_and_record)
        finally:
            self.metrics.observe(scope["path"], scope["method"], status, time.perf_counter() - t0)

    async def _read_body(self, scope, receive) -> bytes | tuple[int, str]:
        """The whole request body, or (status, message) to answer instead."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    return 400, "Content-Length is not a number"
                if int(value) > self.max_body_bytes:
                    return 413, f"request body exceeds {self.max_body_bytes} bytes"
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                return 408, f"request body not received within {self.body_timeout:g} s"
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413, f"request body exceeds {self.max_body_bytes} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _respond(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
