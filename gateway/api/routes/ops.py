"""Health, readiness and metrics."""

from __future__ import annotations

import time

from anyio import to_thread
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import Svc
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
        workers = {q: 0 for q in QUEUES}
        try:
            for k in svc.redis.scan_iter("llama_svc:worker:*", count=100):
                q = k.decode().split(":")[2]
                workers[q] = workers.get(q, 0) + 1
        except Exception:
            pass
        return workers

    workers = await to_thread.run_sync(probe)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks, "workers": workers,
                         "time": time.time()}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response)
async def metrics(svc: Svc) -> Response:
    """Prometheus text format."""
    data = await to_thread.run_sync(generate_latest, svc.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
