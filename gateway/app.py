"""The FastAPI gateway: thin routes over the job store, the checkpoint store and the Celery relay.

It never imports torch, the model, the engine or the trainer. Run: ``uvicorn gateway.app:app``
(or ``python -m services.stack`` for the whole local stack).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway.api.routes import checkpoints, datasets, generate, jobs, ops
from gateway.core.config import Settings, get_settings
from gateway.core.services import Services
from gateway.edge import RequestIdMiddleware, UploadGate
from gateway.limits import BodyLimitMiddleware, upload_limit
from gateway.metrics import Metrics
from shared.jobs.logs import setup_json_logging

log = logging.getLogger("llama_svc.gateway")


def create_app(settings: Settings | None = None, *, reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()
    setup_json_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = Services.build(settings)
        svc.metrics = Metrics(svc.jobs)
        app.state.services = svc
        if reaper:
            svc.start_reaper()
        log.info("gateway ready", extra={"storage": repr(svc.checkpoints.store), "jobs_db": str(settings.jobs_db_path)})
        yield
        svc.close()

    app = FastAPI(title="llama-megatron-svc", version="0.1.0", lifespan=lifespan,
                  description="Convert, reshard, export, finetune and serve Llama-family checkpoints. "
                              "Authenticate with `Authorization: Bearer <key>`.")
    for r in (jobs.router, checkpoints.router, datasets.router, generate.router, ops.router):
        app.include_router(r)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "")
        return JSONResponse({"detail": f"internal server error (request {rid})"}, status_code=500,
                            headers={"X-Request-ID": rid} if rid else None)

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
    return app


def __getattr__(name: str):
    # `uvicorn gateway.app:app` builds the app lazily so importing this module reads no settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
