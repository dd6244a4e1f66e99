"""Health, readiness and metrics."""

from __future__ import annotations

import secrets
import time

from anyio import to_thread
from fastapi import APIRouter, Header, HTTPException, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import Svc
from gateway.metrics import live_workers
from shared.jobs.transport import QUEUES

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """Liveness: the process serves requests."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "a dependency is down"}})
async def ready(svc: Svc):
    """Readiness: job database, object store and Redis reachable; workers seen per queue."""
    checks: dict[str, str] = {}

    def probe():
        for name, fn in (("jobs_db", lambda: svc.jobs.count_active("-")), ("storage", svc.checkpoints.store.ping),
                         ("redis", svc.redis.ping)):
            try:
                fn()
                checks[name] = "ok"
            except Exception as e:
                checks[name] = f"error: {type(e).__name__}: {e}"
        try:
            return live_workers(svc.redis)
        except Exception:
            return {q: 0 for q in QUEUES}

    workers = await to_thread.run_sync(probe)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks, "workers": workers,
                         "time": time.time()}, status_code=200 if ok else 503)


def _check_metrics_token(expected: str, authorization: str | None) -> None:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise HTTPException(401, "metrics need `Authorization: Bearer <metrics token>` (LLAMA_SVC_METRICS_TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})


@router.get("/metrics", response_class=Response, responses={401: {"description": "metrics token required"}})
async def metrics(svc: Svc, authorization: str | None = Header(None, include_in_schema=False)) -> Response:
    """Prometheus text format. With `LLAMA_SVC_METRICS_TOKEN` set, only for its bearer."""
    if svc.settings.metrics_token:
        _check_metrics_token(svc.settings.metrics_token, authorization)
    data = await to_thread.run_sync(generate_latest, svc.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
