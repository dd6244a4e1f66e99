"""The FastAPI gateway: thin routes over the job store, the checkpoint store and the Celery relay.

It never imports torch, the model, the engine or the trainer. Run: ``uvicorn gateway.app:app``
(or ``python -m services.stack`` for the whole local stack).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.routes import checkpoints, datasets, deployments, generate, jobs, ops, uploads
from shared.settings import Settings, get_settings
from gateway.core.services import Services
from gateway.edge import RequestIdMiddleware, UploadGate
from gateway.limits import BodyLimitMiddleware, upload_limit
from gateway.metrics import Metrics
from shared.jobs.logs import setup_json_logging
from shared.protocol.docs import serve_docs
from shared.protocol.errors import describe, megatron_error, openai_error
from shared.protocol.megatron import MESSAGES

OPENAI_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models")

log = logging.getLogger("llama_svc.gateway")


def create_app(settings: Settings | None = None, *, reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()
    settings.require_api_keys()
    setup_json_logging(settings.log_level)
    app = FastAPI(title="llama-megatron-svc", version="0.1.0", lifespan=_lifespan(settings, reaper),
                  docs_url=None, redoc_url=None,
                  description="Convert, reshard, export, finetune and serve Llama-family checkpoints. "
                              "Authenticate with `Authorization: Bearer <key>`.")
    for r in (jobs.router, uploads.checkpoint_router, uploads.dataset_router, checkpoints.router, datasets.router,
              deployments.router, generate.router, ops.router):
        app.include_router(r)
    serve_docs(app)
    _install_error_handlers(app)
    _install_middleware(app, settings)
    return app


def _lifespan(settings: Settings, reaper: bool):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = Services.build(settings)
        svc.metrics = Metrics(svc.jobs, svc.redis)
        app.state.services = svc
        if reaper:
            svc.start_reaper()
        log.info("gateway ready", extra={"storage": repr(svc.checkpoints.store), "jobs_db": repr(svc.jobs)})
        yield
        svc.close()

    return lifespan


def _install_error_handlers(app: FastAPI) -> None:
    """Errors in each route family's own shape: OpenAI's on /v1/completions etc., Megatron's
    ``message`` on /api, FastAPI's ``detail`` elsewhere; never a traceback."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        path = request.url.path
        if path.startswith(OPENAI_PREFIXES):  # OpenAI's 400 with its error body
            message, param = describe(exc.errors())
            return JSONResponse(openai_error(400, message, param), status_code=400)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        body = {"detail": errors}
        if path == "/api":  # Megatron's client reads `message`
            body.update(megatron_error(describe(exc.errors(), MESSAGES)[0]))
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: HTTPException):
        path, headers = request.url.path, getattr(exc, "headers", None)
        if path.startswith(OPENAI_PREFIXES):
            body = openai_error(exc.status_code, str(exc.detail), getattr(exc, "param", None))
            return JSONResponse(body, exc.status_code, headers=headers)
        body = {"detail": exc.detail}
        if path == "/api":
            body.update(megatron_error(str(exc.detail)))
        return JSONResponse(body, exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "")
        return JSONResponse({"detail": f"internal server error (request {rid})"}, status_code=500,
                            headers={"X-Request-ID": rid} if rid else None)


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    def limit_for(scope) -> int:
        upload = upload_limit(settings, scope)
        return upload[0] if upload else settings.max_body_bytes

    # outermost first: request id, access log, upload gate (before any body byte), body limit
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(UploadGate)

    @app.middleware("http")
    async def _access_log(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        svc = getattr(request.app.state, "services", None)
        if svc is not None:
            svc.metrics.http.labels(request.method, getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        log.info("request", extra={"method": request.method, "path": request.url.path, "status": response.status_code,
                                   "ms": round((time.perf_counter() - t0) * 1e3, 2),
                                   "team": getattr(request.state, "team", None)})
        return response

    app.add_middleware(RequestIdMiddleware)


def __getattr__(name: str):
    # `uvicorn gateway.app:app` builds the app lazily so importing this module reads no settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
