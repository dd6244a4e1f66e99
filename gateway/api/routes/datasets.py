"""Datasets API: a team's finetune data as JSONL, uploaded once and named by finetune jobs."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Query, Request

from gateway.api.deps import Svc
from gateway.api.schemas import DatasetList, DatasetOut, Name
from gateway.auth import Team
from shared.storage import DATASET_FILE, CheckpointExists, CheckpointNotFound
from shared.specs.records import DataError, check_jsonl

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
NOT_FOUND = {404: {"description": "no such dataset for this team"}}


def dataset_out(m: dict) -> DatasetOut:
    st = m["storage"]
    return DatasetOut(name=st["name"], committed_at=st["committed_at"], bytes=st["bytes"],
                      records=m["dataset"]["records"], sha256=st["files"][DATASET_FILE]["sha256"])


@router.post("", status_code=201, response_model=DatasetOut, responses={
    409: {"description": "a dataset of this name exists"}, 413: {"description": "dataset too large"},
    422: {"description": "a line is not a valid record (the message names it)"}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/x-ndjson": {
        "schema": {"type": "string", "format": "binary"}}}}})
async def upload_dataset(request: Request, svc: Svc, team: Team, name: Annotated[Name, Query()]) -> DatasetOut:
    """Upload JSONL (the raw request body): one `{"text"}`, `{"prompt", "completion"}` or
    `{"messages"}` record per line. Every line is checked before the dataset becomes visible."""
    if await to_thread.run_sync(svc.datasets.exists, team, name):
        raise HTTPException(409, f"dataset {name!r} already exists; choose another name or delete it first")
    tmp = Path(tempfile.mkdtemp(prefix="dataset-", dir=svc.settings.data_dir))
    try:
        with open(tmp / DATASET_FILE, "wb") as out:  # the size limit is the gateway's (gateway.limits)
            async for chunk in request.stream():
                out.write(chunk)
        try:
            records = await to_thread.run_sync(check_jsonl, tmp / DATASET_FILE, name)
        except DataError as e:
            raise HTTPException(422, str(e)) from None
        meta = {"format": "jsonl", "dataset": {"records": records},
                "service": {"uploaded_at": time.time(), "team": team}}
        try:
            m = await to_thread.run_sync(lambda: svc.datasets.commit(team, name, tmp, meta=meta))
        except CheckpointExists as e:
            raise HTTPException(409, str(e)) from None
        return dataset_out(m)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@router.get("", response_model=DatasetList)
async def list_datasets(svc: Svc, team: Team) -> DatasetList:
    return DatasetList(datasets=[dataset_out(m) for m in await to_thread.run_sync(svc.datasets.list, team)])


async def _manifest(svc, team: str, name: str) -> dict:
    try:
        return await to_thread.run_sync(svc.datasets.manifest, team, name)
    except CheckpointNotFound:
        raise HTTPException(404, f"dataset {name!r} not found") from None


@router.get("/{name}", response_model=DatasetOut, responses=NOT_FOUND)
async def get_dataset(name: Name, svc: Svc, team: Team) -> DatasetOut:
    return dataset_out(await _manifest(svc, team, name))


@router.delete("/{name}", status_code=204, responses=NOT_FOUND)
async def delete_dataset(name: Name, svc: Svc, team: Team) -> None:
    await _manifest(svc, team, name)
    await to_thread.run_sync(svc.datasets.delete, team, name)
