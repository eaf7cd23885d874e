"""Prometheus text-format metrics and the body guard (size limit, receive timeout), as one thin ASGI middleware
(stdlib only)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RELOAD_RESULTS = ("ok", "error", "busy")  # busy: refused (409) because another reload was running


class Metrics:
    """Request counts by (path, method, status), a latency histogram by path, fallbacks and reloads."""

    def __init__(self, paths: set[str]):
        self.paths = paths  # anything else is counted as "other", so unknown URLs cannot grow the label set
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.latency: dict[str, list] = {}  # path -> [count per bucket..., +Inf count, sum of seconds]
        self.fallbacks = 0
        self.reloads: Counter = Counter()

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        path = path if path in self.paths else "other"
        method = method if method in METHODS else "other"  # any token is a valid HTTP method
        with self._lock:
            self.requests[(path, method, status)] += 1
            h = self.latency.setdefault(path, [0] * (len(LATENCY_BUCKETS) + 2))
            for i, le in enumerate(LATENCY_BUCKETS):
                if seconds <= le:
                    h[i] += 1
            h[-2] += 1
            h[-1] += seconds

    def fallback(self, n: int = 1) -> None:
        with self._lock:
            self.fallbacks += n

    def reload(self, result: str) -> None:
        if result not in RELOAD_RESULTS:
            raise ValueError(f"reload result must be one of {RELOAD_RESULTS}, got {result!r}")
        with self._lock:
            self.reloads[result] += 1

    def render(self, model: str | None) -> str:
        with self._lock:
            lines = ["# TYPE sasrec_requests_total counter"]
            for (path, method, status), n in sorted(self.requests.items()):
                lines.append(f'sasrec_requests_total{{path="{path}",method="{method}",status="{status}"}} {n}')
            lines.append("# TYPE sasrec_request_seconds histogram")
            for path, h in sorted(self.latency.items()):
                for le, n in zip(LATENCY_BUCKETS, h):
                    lines.append(f'sasrec_request_seconds_bucket{{path="{path}",le="{le}"}} {n}')
                lines.append(f'sasrec_request_seconds_bucket{{path="{path}",le="+Inf"}} {h[-2]}')
                lines.append(f'sasrec_request_seconds_sum{{path="{path}"}} {h[-1]:.6f}')
                lines.append(f'sasrec_request_seconds_count{{path="{path}"}} {h[-2]}')
            lines += ["# TYPE sasrec_fallbacks_total counter", f"sasrec_fallbacks_total {self.fallbacks}"]
            lines.append("# TYPE sasrec_reloads_total counter")
            lines += [f'sasrec_reloads_total{{result="{r}"}} {self.reloads[r]}' for r in RELOAD_RESULTS]
        if model:
            lines += ["# TYPE sasrec_model_info gauge", f'sasrec_model_info{{model="{model}"}} 1']
        return "\n".join(lines) + "\n"


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
