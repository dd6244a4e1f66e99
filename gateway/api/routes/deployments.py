"""Deployments (a model kept loaded on N generate workers) and the generate workers' state."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.deps import Svc
from gateway.auth import Team
from shared.jobs import placement
from shared.protocol.limits import Name

router = APIRouter(tags=["deployments"])
NOT_FOUND = {404: {"description": "no such deployment for this team"}}


class DeploymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Name
    replicas: int = Field(1, ge=1, le=64, description="generate workers that keep the model loaded")


class DeploymentOut(BaseModel):
    id: str
    model: str
    replicas: int
    created_at: float
    workers: list[str | None] = Field(description="the worker holding each replica (null: not yet placed)")


class WorkerOut(BaseModel):
    worker: str
    models: list[str] = Field(description="this team's models the worker has loaded")
    load: int
    capacity: int


def _out(svc, d: placement.Deployment) -> DeploymentOut:
    return DeploymentOut(id=d.id, model=d.model, replicas=d.replicas, created_at=d.created_at,
                         workers=placement.replica_holders(svc.redis, d))


@router.post("/v1/deployments", status_code=201, response_model=DeploymentOut, responses={
    404: {"description": "no such model"}})
async def create_deployment(req: DeploymentIn, svc: Svc, team: Team) -> DeploymentOut:
    """Keep ``model`` loaded on ``replicas`` generate workers; its requests go to them."""
    if not await to_thread.run_sync(svc.checkpoints.exists, team, req.model):
        raise HTTPException(404, f"model {req.model!r} not found: upload or convert a checkpoint first")
    d = await to_thread.run_sync(svc.deployments.create, team, req.model, req.replicas)
    return await to_thread.run_sync(_out, svc, d)


@router.get("/v1/deployments", response_model=list[DeploymentOut])
async def list_deployments(svc: Svc, team: Team) -> list[DeploymentOut]:
    return await to_thread.run_sync(lambda: [_out(svc, d) for d in svc.deployments.list(team)])


@router.delete("/v1/deployments/{dep_id}", status_code=204, responses=NOT_FOUND)
async def delete_deployment(dep_id: Name, svc: Svc, team: Team) -> None:
    """The model stops being pinned; workers may evict it when they need the memory."""
    try:
        await to_thread.run_sync(svc.deployments.get, team, dep_id)
    except KeyError:
        raise HTTPException(404, f"deployment {dep_id!r} not found") from None
    await to_thread.run_sync(svc.deployments.delete, team, dep_id)


@router.get("/v1/workers", response_model=list[WorkerOut])
async def workers(svc: Svc, team: Team) -> list[WorkerOut]:
    """Live generate workers, their load, and which of this team's models each has loaded."""
    live = await to_thread.run_sync(placement.live_workers, svc.redis)
    mine = f"{team}/"
    return [WorkerOut(worker=w.worker, models=[m[len(mine):] for m in w.models if m.startswith(mine)],
                      load=w.load, capacity=w.capacity) for w in live]
