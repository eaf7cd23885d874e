"""The HTTP service: FastAPI routes over a Predictor that is loaded in the lifespan and swapped atomically on reload."""

# No `from __future__ import annotations` here: the request models are built per app (their limits are
# settings), and FastAPI resolves string annotations in module globals, where those models are not.

import hmac
import logging
import os
import re
import signal
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve.bundle import BundleError
from serve.metrics import Guard, Metrics
from serve.predictor import InvalidRequest, Predictor
from serve.use_cases import session_focus

log = logging.getLogger("uvicorn.error")  # shows up in uvicorn's log, formatted like its own lines

ENV_BUNDLE, ENV_THREADS, ENV_ADMIN_TOKEN = "SASREC_SERVE_BUNDLE", "SASREC_SERVE_THREADS", "SASREC_ADMIN_TOKEN"


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


class Model:
    """The current Predictor behind one reference. A request reads `model.predictor` once and uses that object
    to the end, so a reload (a new Predictor built beside the old one, then one assignment) never changes the
    model under a request in flight, and the old one is freed when its last request ends."""

    def __init__(self, bundle_dir: str | Path, threads: int, limits: Limits, metrics: Metrics):
        self.bundle_dir = Path(bundle_dir)
        self.threads = threads
        self.limits = limits
        self.metrics = metrics
        self.predictor: Predictor | None = None
        self._reload_lock = threading.Lock()  # one reload at a time; requests never take it

    def load(self, bundle_dir: str | Path | None = None) -> Predictor:
        with self._reload_lock:
            path = Path(bundle_dir) if bundle_dir else self.bundle_dir
            old = self.predictor
            try:
                new = Predictor.load(path, self.threads, max_session_items=self.limits.max_session_items)
            except BundleError:
                if old is not None:
                    self.metrics.reload(ok=False)
                raise
            self.predictor, self.bundle_dir = new, path  # the swap: one reference assignment
            if old is not None:
                self.metrics.reload(ok=True)
        log.info("serving %s (model %s)%s", path, new.sha, f", was {old.sha}" if old else "")
        return new

    def reload_in_background(self) -> None:
        def run():
            try:
                self.load()
            except BundleError as e:
                log.error("reload failed, still serving %s: %s", self.predictor.sha, e)

        threading.Thread(target=run, name="sasrec-reload", daemon=True).start()


def _encodable(s: str) -> str:
    s.encode("utf-8")  # a lone surrogate ("\ud800" in the JSON) raises here, not when the answer is encoded
    return s


def _models(limits: Limits):
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
        bundle: str | None = None

    return RecommendRequest, BatchRequest, FocusRequest, ReloadRequest


def _loc(field: str) -> list:
    """ "sessions[3][1]" -> ["body", "sessions", 3, 1], as pydantic reports locations."""
    return ["body"] + [int(p) if p.isdigit() else p for p in re.findall(r"[^\[\]]+", field)]


def create_app(
    bundle_dir: str | Path, *, threads: int = 1, limits: Limits = Limits(), admin_token: str | None = None
) -> FastAPI:
    """The service for BUNDLE_DIR; the model is loaded when the app starts (its lifespan), not here."""
    paths = {"/v1/recommend", "/v1/recommend/batch", "/v1/session-focus", "/v1/model", "/healthz", "/readyz"}
    metrics = Metrics(paths | {"/metrics", "/admin/reload"})
    model = Model(bundle_dir, threads, limits, metrics)
    RecommendRequest, BatchRequest, FocusRequest, ReloadRequest = _models(limits)

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

    app = FastAPI(title="sasrec-jax", version="1", lifespan=lifespan)
    app.state.model = model
    app.add_middleware(Guard, metrics=metrics, max_body_bytes=limits.max_body_bytes)

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
        # the bundle was verified): the service cannot answer this call until the bundle is reloaded
        log.error("bundle error while serving %s: %s", request.url.path, e)
        return JSONResponse({"detail": f"the model cannot answer this request: {e}"}, status_code=503)

    # Endpoints are plain `def`: FastAPI runs them in its thread pool, and onnxruntime releases the GIL,
    # so concurrent requests use every core while the event loop stays free.

    @app.post("/v1/recommend")
    def recommend(body: RecommendRequest):
        p = model.predictor
        rec = p.recommend(body.items, body.k, body.exclude_seen, body.exclude, body.temperature, body.seed,
                          body.normalize)  # fmt: skip
        if rec.fallback:
            metrics.fallback()
        return {**rec.to_dict(), "model": p.sha}

    @app.post("/v1/recommend/batch")
    def recommend_batch(body: BatchRequest):
        p = model.predictor
        recs = p.recommend_batch(body.sessions, body.k, body.exclude_seen, body.exclude, body.temperature,
                                 body.seed, body.normalize)  # fmt: skip
        metrics.fallback(sum(r.fallback for r in recs))
        return {"results": [r.to_dict() for r in recs], "model": p.sha}

    @app.post("/v1/session-focus")
    def focus(body: FocusRequest):
        p = model.predictor
        idx, unknown = p.lookup(body.items)
        return {"focus": session_focus(p, body.items), "known": len(set(idx)), "unknown": unknown, "model": p.sha}

    @app.get("/v1/model")
    def model_info():
        p = model.predictor
        return {"model": p.sha, "bundle_dir": str(p.bundle_dir), "threads": p.threads, "manifest": p.manifest}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        p = model.predictor
        if p is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "model": p.sha}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        p = model.predictor
        return PlainTextResponse(metrics.render(p.sha if p else None), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload")
    def reload(body: ReloadRequest | None = None, x_admin_token: Annotated[str | None, Header()] = None):
        """Loads the serving bundle directory again (or `bundle`), verifies it, then swaps it in."""
        if admin_token and not hmac.compare_digest(x_admin_token or "", admin_token):
            raise HTTPException(403, "X-Admin-Token header missing or wrong")
        old = model.predictor
        try:
            new = model.load(body.bundle if body else None)
        except BundleError as e:
            raise HTTPException(422, f"reload failed, still serving {old.sha}: {e}") from None
        return {"model": new.sha, "previous": old.sha, "bundle_dir": str(new.bundle_dir)}

    return app


def app_from_env() -> FastAPI:
    """The factory `uvicorn serve.app:app_from_env --factory` (and every --workers process) calls."""
    if ENV_BUNDLE not in os.environ:
        raise RuntimeError(f"set {ENV_BUNDLE} to the bundle directory")
    return create_app(
        os.environ[ENV_BUNDLE],
        threads=int(os.environ.get(ENV_THREADS, "1")),
        admin_token=os.environ.get(ENV_ADMIN_TOKEN) or None,
    )
