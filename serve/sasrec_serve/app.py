"""The HTTP service: FastAPI routes over a Predictor that is loaded in the lifespan and swapped atomically on reload.

Security model (README, "Serving"): the admin endpoint exists only with a token; a reload loads bundles from under
one root directory only; answers name files relative to the bundle, never a host path; one reload at a time;
/docs, /redoc and /openapi.json only when asked for; timeouts on headers, bodies and idle connections.
"""

# No `from __future__ import annotations` here: the request models are classes defined per app, in create_app
# (their limits are settings), and FastAPI resolves string annotations in module globals, where those are not.

import asyncio
import functools
import hashlib
import hmac
import importlib.util
import logging
import math
import os
import re
import signal
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from sasrec_serve.bundle import BundleError
from sasrec_serve.metrics import Guard, Metrics
from sasrec_serve.predictor import InvalidRequest, Predictor
from sasrec_serve.use_cases import session_focus

log = logging.getLogger("uvicorn.error")  # shows up in uvicorn's log, formatted like its own lines

# every worker process builds its app from these (uvicorn needs an import string for --workers > 1)
ENV_BUNDLE, ENV_THREADS, ENV_ADMIN_TOKEN = "SASREC_SERVE_BUNDLE", "SASREC_SERVE_THREADS", "SASREC_ADMIN_TOKEN"
ENV_BUNDLE_ROOT, ENV_DOCS = "SASREC_SERVE_BUNDLE_ROOT", "SASREC_SERVE_DOCS"
ENV_BODY_TIMEOUT = "SASREC_SERVE_BODY_TIMEOUT"


@dataclass(frozen=True)
class Limits:
    """What one request may ask; beyond these the service answers 413 (body) or 422 (naming the field)."""

    max_session_items: int = 1000
    max_k: int = 1000
    max_batch: int = 256
    max_exclude: int = 1000
    max_id_chars: int = 256
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        bad = {k: v for k, v in vars(self).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"limits must be positive integers: {bad}")


@dataclass(frozen=True)
class Timeouts:
    """Seconds a client gets (`python -m sasrec_serve --header-timeout/--body-timeout/--keep-alive-timeout`). `body` is
    enforced by the app (408); `header` and `keep_alive` by the server (`server_options`), which closes the
    connection."""

    header: float = 10.0  # to send complete request headers, from connecting or from the previous response
    body: float = 30.0  # to send the whole body, from the end of the headers
    keep_alive: float = 5.0  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)

    def __post_init__(self):
        bad = {
            k: v
            for k, v in vars(self).items()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
        }
        if bad:
            raise ValueError(f"timeouts must be positive numbers of seconds: {bad}")


class ReloadBusy(Exception):
    """Another reload is running (HTTP 409)."""


class OutsideRoot(Exception):
    """A reload named a directory that is not under the bundle root (HTTP 403)."""


class Model:
    """The current Predictor behind one reference. A request reads `model.predictor` once and uses that object
    to the end, so a reload (a new Predictor built beside the old one, then one assignment) never changes the
    model under a request in flight, and the old one is freed when its last request ends."""

    def __init__(
        self, bundle_dir: str | Path, threads: int, limits: Limits, metrics: Metrics, bundle_root: str | Path | None
    ):
        self.bundle_dir = Path(bundle_dir)
        self.bundle_root = Path(bundle_root).resolve() if bundle_root else self.bundle_dir.resolve().parent
        self.threads = threads
        self.limits = limits
        self.metrics = metrics
        self.predictor: Predictor | None = None
        self._reload_lock = threading.Lock()  # one reload at a time; requests never take it

    def current(self) -> Predictor:
        """The predictor serving now. The lifespan loads one before the app takes requests, so an endpoint always
        finds one; /readyz, which may be asked while it loads, reads `predictor` itself."""
        p = self.predictor
        if p is None:
            raise RuntimeError("no model is loaded yet")
        return p

    def load(self, bundle_dir: Path | None = None, *, wait: bool = True) -> Predictor:
        """Loads `bundle_dir` (default: the bundle served now, read again) beside the current predictor, then
        swaps it in. One load at a time: with `wait=False`, raises ReloadBusy at once while another runs (an HTTP
        reload must not hold a worker thread waiting); SIGHUP waits its turn in its own thread."""
        if not self._reload_lock.acquire(blocking=wait):
            self.metrics.reload("busy")
            raise ReloadBusy
        try:
            path = bundle_dir or self.bundle_dir
            old = self.predictor
            try:
                new = Predictor.load(path, self.threads, max_session_items=self.limits.max_session_items)
            except BundleError as e:
                if old is not None:
                    self.metrics.reload("error")
                log.error("loading %s failed%s: %s", path, f", still serving {old.sha}" if old else "", e)
                raise
            self.predictor, self.bundle_dir = new, path  # the swap: one reference assignment
            self.metrics.serving(new.sha, old.sha if old else None)
            if old is not None:
                self.metrics.reload("ok")
        finally:
            self._reload_lock.release()
        log.info("serving %s (model %s)%s", path, new.sha, f", was {old.sha}" if old else "")
        return new

    def resolve(self, requested: str) -> Path:
        """The directory a reload request names, relative to the bundle root (or absolute), with symlinks
        resolved; OutsideRoot unless that is the root or a directory under it."""
        try:
            path = (self.bundle_root / requested).resolve()
        except (OSError, ValueError, RuntimeError):  # NUL, unencodable, a symlink loop
            raise OutsideRoot from None
        if path != self.bundle_root and self.bundle_root not in path.parents:
            raise OutsideRoot
        return path

    def reload_in_background(self) -> None:
        def run():
            try:
                self.load()
            except BundleError:
                pass  # logged by load; the old model keeps serving

        threading.Thread(target=run, name="sasrec-reload", daemon=True).start()


def _encodable(s: str) -> str:
    s.encode("utf-8")  # a lone surrogate ("\ud800" in the JSON) raises here, not when the answer is encoded
    return s


def _loc(field: str) -> list:
    """ "sessions[3][1]" -> ["body", "sessions", 3, 1], as pydantic reports locations."""
    return ["body"] + [int(p) if p.isdigit() else p for p in re.findall(r"[^\[\]]+", field)]


def _token_matches(headers: list[tuple[bytes, bytes]], token_sha256: bytes) -> bool:
    """Whether the request carries exactly one X-Admin-Token equal to the token. Both sides are hashed and
    compared as bytes in constant time, so no header value (any length, latin-1, invalid UTF-8) can raise or
    leak the token's length."""
    given = [value for name, value in headers if name.lower() == b"x-admin-token"]
    return len(given) == 1 and hmac.compare_digest(hashlib.sha256(given[0]).digest(), token_sha256)


def _display_name(path: Path) -> str:
    """A directory's name as text any answer can carry (a name that is not UTF-8 gets U+FFFD)."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def create_app(
    bundle_dir: str | Path,
    *,
    threads: int = 1,
    limits: Limits = Limits(),
    admin_token: str | None = None,
    bundle_root: str | Path | None = None,
    docs: bool = False,
    timeouts: Timeouts = Timeouts(),
) -> FastAPI:
    """The service for BUNDLE_DIR; the model is loaded when the app starts (its lifespan), not here.

    `admin_token`: POST /admin/reload exists only with one (otherwise 404, as if absent; SIGHUP still reloads).
    `bundle_root`: a reload's `{"bundle": ...}` must be a directory under it (default: BUNDLE_DIR's parent).
    `docs`: serve /docs, /redoc and /openapi.json. Of `timeouts`, the app enforces `body`."""
    token_sha256 = None
    if admin_token:
        try:
            token_sha256 = hashlib.sha256(admin_token.encode("utf-8")).digest()
        except UnicodeEncodeError:
            raise ValueError("the admin token must be text that UTF-8 can encode") from None
    paths = {"/v1/recommend", "/v1/recommend/batch", "/v1/session-focus", "/v1/model", "/healthz", "/readyz"}
    metrics = Metrics(paths | {"/metrics"} | ({"/admin/reload"} if token_sha256 else set()))
    model = Model(bundle_dir, threads, limits, metrics, bundle_root)

    # The request models: defined here, not at module level, because their limits are this app's settings.
    ItemId = StrictInt | Annotated[StrictStr, Field(max_length=limits.max_id_chars), AfterValidator(_encodable)]
    Session = Annotated[list[ItemId], Field(max_length=limits.max_session_items)]

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: StrictInt = Field(10, ge=1, le=limits.max_k)
        exclude: list[ItemId] = Field(default_factory=list, max_length=limits.max_exclude)
        exclude_seen: StrictBool = True
        temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
        seed: Annotated[StrictInt, Field(ge=0)] | None = None
        normalize: StrictBool = False

    class RecommendRequest(Options):
        items: Session

    class BatchRequest(Options):
        sessions: list[Session] = Field(max_length=limits.max_batch)

    class FocusRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: Session

    class ReloadRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bundle: Annotated[StrictStr, Field(min_length=1, max_length=4096), AfterValidator(_encodable)] | None = None

    reload_body = TypeAdapter(ReloadRequest | None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model.load()
        on_main = threading.current_thread() is threading.main_thread()  # signals only reach the main thread
        previous = signal.signal(signal.SIGHUP, lambda *_: model.reload_in_background()) if on_main else None
        try:
            yield
        finally:
            if on_main:
                signal.signal(signal.SIGHUP, previous)
            metrics.process_exit()

    app = FastAPI(
        title="sasrec-jax",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.model = model
    app.add_middleware(Guard, metrics=metrics, max_body_bytes=limits.max_body_bytes, body_timeout=timeouts.body)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        # pydantic's errors without the offending input: it may be NaN or Infinity (which JSON cannot carry)
        # or a large part of the body
        detail = [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, e: InvalidRequest):
        return JSONResponse(
            {"detail": [{"loc": _loc(e.field), "msg": e.message, "type": "value_error"}]}, status_code=422
        )

    @app.exception_handler(BundleError)
    async def bundle_failed(request: Request, e: BundleError):
        # a graph the predictor loads on first use could not be loaded (its file was removed or replaced since
        # the bundle was verified), or the model gave no finite score: the service cannot answer this call
        # until the bundle is reloaded
        log.error("bundle error while serving %s: %s", request.url.path, e)
        return JSONResponse({"detail": f"the model cannot answer this request: {e}"}, status_code=503)

    # Endpoints are plain `def`: FastAPI runs them in its thread pool, and onnxruntime releases the GIL,
    # so concurrent requests use every core while the event loop stays free.

    @app.post("/v1/recommend")
    def recommend(body: RecommendRequest):
        p = model.current()
        rec = p.recommend(body.items, body.k, body.exclude_seen, body.exclude, body.temperature, body.seed,
                          body.normalize)  # fmt: skip
        if rec.fallback:
            metrics.fallback()
        return {**rec.to_dict(), "model": p.sha}

    @app.post("/v1/recommend/batch")
    def recommend_batch(body: BatchRequest):
        p = model.current()
        recs = p.recommend_batch(body.sessions, body.k, body.exclude_seen, body.exclude, body.temperature,
                                 body.seed, body.normalize)  # fmt: skip
        metrics.fallback(sum(r.fallback for r in recs))
        return {"results": [r.to_dict() for r in recs], "model": p.sha}

    @app.post("/v1/session-focus")
    def focus(body: FocusRequest):
        p = model.current()
        idx, unknown = p.lookup(body.items)
        return {"focus": session_focus(p, body.items), "known": len(set(idx)), "unknown": unknown, "model": p.sha}

    @app.get("/v1/model")
    def model_info():
        # the bundle by its directory's name and its manifest's hash, never by host path; the manifest parses
        # without NaN or lone surrogates (sasrec_serve.bundle.parse_json), so it can always be answered
        p = model.current()
        return {"model": p.sha, "manifest_sha256": p.manifest_sha256, "bundle": _display_name(p.bundle_dir),
                "threads": p.threads, "manifest": p.manifest}  # fmt: skip

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        p = model.predictor
        if p is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "model": p.sha}

    @app.get("/metrics", response_class=Response)
    def prometheus(request: Request):
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    if token_sha256 is None:
        return app

    @app.post("/admin/reload")
    async def reload(request: Request):
        """Loads the served bundle directory again (or `{"bundle": DIR}`, a directory under the bundle root),
        verifies it, then swaps it in; 409 at once while another reload runs."""
        # the token before anything else: a request without it learns nothing, not even how bodies are checked
        if not _token_matches(request.scope["headers"], token_sha256):
            raise HTTPException(403, "X-Admin-Token header missing or wrong")
        raw = await request.body()
        try:
            body = reload_body.validate_json(raw) if raw.strip() else None
        except ValidationError as e:
            errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
            raise RequestValidationError(errors) from None
        path = None
        if body is not None and body.bundle is not None:
            try:
                path = model.resolve(body.bundle)
            except OutsideRoot:
                log.warning("reload refused: %r is not under the bundle root %s", body.bundle, model.bundle_root)
                raise HTTPException(403, "bundle must name a directory under the server's bundle root") from None
        old = model.current()
        try:
            new = await run_in_threadpool(model.load, path, wait=False)
        except ReloadBusy:
            raise HTTPException(409, "another reload is running; this one was not started") from None
        except BundleError as e:  # its text names files relative to the bundle; the log has the path
            raise HTTPException(422, f"reload failed, still serving {old.sha}: {e}") from None
        return {"model": new.sha, "previous": old.sha, "bundle": _display_name(new.bundle_dir)}

    return app


def app_from_env() -> FastAPI:
    """The factory `uvicorn sasrec_serve.app:app_from_env --factory` (and every --workers process) calls."""
    if ENV_BUNDLE not in os.environ:
        raise RuntimeError(f"set {ENV_BUNDLE} to the bundle directory")
    return create_app(
        os.environ[ENV_BUNDLE],
        threads=int(os.environ.get(ENV_THREADS, "1")),
        admin_token=os.environ.get(ENV_ADMIN_TOKEN) or None,
        bundle_root=os.environ.get(ENV_BUNDLE_ROOT) or None,
        docs=os.environ.get(ENV_DOCS) == "1",
        timeouts=Timeouts(body=float(os.environ.get(ENV_BODY_TIMEOUT) or Timeouts.body)),
    )


# -- the HTTP server: a header timeout for uvicorn's protocol ------------------------------------------------
#
# uvicorn closes idle keep-alive connections (timeout_keep_alive) but has no timeout for reading a request's
# headers: a connection that sends nothing after connecting, or "POST / HTTP/1.1\r\n" and then a byte now and
# then, stays open for ever (the keep-alive timer only runs between requests, and any byte cancels it). A
# thousand of them hold a thousand sockets, and with limit_concurrency they lock real clients out. This mixin
# adds the one missing timer to uvicorn's own protocol class (h11, or httptools when installed, as uvicorn's
# "auto" picks); everything else is uvicorn's.

# The type checker sees h11's class only: httptools' has the same members the mixin uses (cycle, transport, loop
# and the four callbacks), and one name cannot have two class types.
if TYPE_CHECKING or importlib.util.find_spec("httptools") is None:
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornHTTP
else:  # pragma: no cover - not installed on the test machine
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornHTTP

if TYPE_CHECKING:
    # to the type checker the mixin is a subclass of the protocol it is mixed into, so its super() calls and
    # self.cycle/transport/loop are checked against uvicorn's; at run time it is a plain mixin (HTTPProtocol below)
    _MixinBase = _UvicornHTTP
else:
    _MixinBase = object


class HeaderTimeout(_MixinBase):
    """Closes a connection whose request headers are not complete `header_timeout` seconds after it opened or
    after the previous response; a mixin for uvicorn's HTTP/1.1 protocols (both set `self.cycle` when a request's
    headers are complete and call `on_response_complete` when its response is sent)."""

    def __init__(self, *args: Any, header_timeout: float = Timeouts.header, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._cycle_before: object = None  # the request cycle when the timer was armed: a new one means new headers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio hands a stream protocol an asyncio.Transport, the narrower type uvicorn's signature declares
        super().connection_made(cast(asyncio.Transport, transport))
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._cycle_before:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request whose headers were already read
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._cycle_before = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closed a connection that sent no complete request headers in %g s", self.header_timeout)
            self.transport.close()


class HTTPProtocol(HeaderTimeout, _UvicornHTTP):
    pass


def server_options(timeouts: Timeouts = Timeouts(), limit_concurrency: int = 256) -> dict:
    """uvicorn.run / uvicorn.Config keyword arguments for the service: the header timeout (the protocol above;
    a functools.partial of a module-level class, so it pickles for --workers), the keep-alive timeout, at most
    `limit_concurrency` connections + requests in progress (beyond: 503), and no WebSocket upgrades."""
    return {
        "http": functools.partial(HTTPProtocol, header_timeout=timeouts.header),
        "timeout_keep_alive": timeouts.keep_alive,
        "limit_concurrency": limit_concurrency,
        "ws": "none",
    }
