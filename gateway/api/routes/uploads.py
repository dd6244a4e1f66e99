"""Direct uploads: checkpoint files and datasets go from the client straight to the object store.

``POST /v1/checkpoints/uploads`` declares a checkpoint's files (path, size, sha256) and
``POST /v1/datasets/uploads`` a dataset's one JSONL file; both answer presigned ``PUT`` URLs.
The client sends the bytes to the store; ``POST …/uploads/{id}/complete`` checks that every file
arrived whole and submits the import job that verifies the hashes and the content and commits
it. The gateway never carries the bytes. A store that cannot sign URLs (the local directory)
answers 501: upload through ``POST /v1/checkpoints`` / ``POST /v1/datasets`` there.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, HTTPException

from gateway.api.deps import Svc
from gateway.api.routes.jobs import enqueue, job_out
from gateway.api.schemas import DatasetUploadRequest, DirectUploadOut, DirectUploadRequest, ImportJob, JobOut
from gateway.auth import Team
from shared.checkpoint.upload import WEIGHT_SUFFIXES, BadUpload, check_file_list
from shared.storage import DATASET_FILE
from shared.storage.base import DirectTransferUnsupported
from shared.storage.uploads import DeclaredFile, UploadIncomplete, UploadNotFound

checkpoint_router = APIRouter(prefix="/v1/checkpoints/uploads", tags=["checkpoints"])
dataset_router = APIRouter(prefix="/v1/datasets/uploads", tags=["datasets"])
NOT_FOUND = {404: {"description": "no such upload for this team (or it expired)"}}
OPEN_ERRORS = {409: {"description": "a checkpoint or dataset of this name exists"},
               413: {"description": "upload too large"},
               501: {"description": "this object store cannot sign URLs: upload through the gateway"}}


def _checkpoint_files(req: DirectUploadRequest, limit: int) -> list[DeclaredFile]:
    try:
        paths = check_file_list(f.path for f in req.files)
    except BadUpload as e:
        raise HTTPException(422, str(e)) from None
    if "config.json" not in paths or not any(p.endswith(WEIGHT_SUFFIXES) for p in paths):
        raise HTTPException(422, "an HF checkpoint needs config.json and weight files (*.safetensors, *.bin, *.pth)")
    total = sum(f.size for f in req.files)
    if total > limit:
        raise HTTPException(413, f"the files add up to {total} bytes, over the {limit}-byte limit "
                                 "(LLAMA_SVC_MAX_UPLOAD_BYTES)")
    return [DeclaredFile(p, f.size, f.sha256) for p, f in zip(paths, req.files)]


async def _open(svc, team: str, name: str, files: list[DeclaredFile], target: str) -> DirectUploadOut:
    store = svc.datasets if target == "dataset" else svc.checkpoints
    if await to_thread.run_sync(store.exists, team, name):
        raise HTTPException(409, f"{target} {name!r} already exists; choose another name")
    try:
        record = await to_thread.run_sync(svc.uploads.open, team, name, files, svc.settings.direct_upload_ttl_s,
                                          target)
    except DirectTransferUnsupported:
        raise HTTPException(501, "this service keeps its objects in a local directory, which cannot take direct "
                                 "uploads; send the bytes through the gateway instead") from None
    return DirectUploadOut(upload_id=record["id"], name=record["name"], expires_at=record["expires_at"],
                           files=[{k: f[k] for k in ("path", "size", "part_size", "urls")} for f in record["files"]])


@checkpoint_router.post("", status_code=201, response_model=DirectUploadOut, responses=OPEN_ERRORS)
async def open_checkpoint_upload(req: DirectUploadRequest, svc: Svc, team: Team) -> DirectUploadOut:
    """Declare an HF checkpoint's files; PUT each part to its URL, then complete the upload."""
    return await _open(svc, team, req.name, _checkpoint_files(req, svc.settings.max_upload_bytes), "checkpoint")


@dataset_router.post("", status_code=201, response_model=DirectUploadOut, responses=OPEN_ERRORS)
async def open_dataset_upload(req: DatasetUploadRequest, svc: Svc, team: Team) -> DirectUploadOut:
    """Declare a JSONL dataset (size, sha256); PUT its parts to their URLs, then complete the upload."""
    if req.size > svc.settings.max_dataset_bytes:
        raise HTTPException(413, f"the dataset is {req.size} bytes, over the {svc.settings.max_dataset_bytes}-byte "
                                 "limit (LLAMA_SVC_MAX_DATASET_BYTES)")
    return await _open(svc, team, req.name, [DeclaredFile(DATASET_FILE, req.size, req.sha256)], "dataset")


async def _record(svc, team: str, upload_id: str, target: str) -> dict:
    try:
        record = await to_thread.run_sync(svc.uploads.get, team, upload_id)
    except (UploadNotFound, ValueError):
        record = None
    if record is None or record.get("target", "checkpoint") != target:
        raise HTTPException(404, f"upload {upload_id!r} not found (or it expired)")
    return record


async def _complete(svc, team: str, upload_id: str, target: str) -> JobOut:
    record = await _record(svc, team, upload_id, target)
    if "completed_at" not in record:
        try:
            await to_thread.run_sync(svc.uploads.finish, record)
        except UploadIncomplete as e:
            raise HTTPException(409, str(e)) from None
        await to_thread.run_sync(svc.uploads.keep, record, svc.settings.direct_upload_ttl_s)
    job, _ = await enqueue(svc, team, ImportJob(kind="import", upload=upload_id, output=record["name"], target=target),
                           idempotency_key=f"upload-{upload_id}")
    return job_out(job)


async def _abort(svc, team: str, upload_id: str, target: str) -> None:
    record = await _record(svc, team, upload_id, target)
    if "completed_at" in record:
        raise HTTPException(409, f"upload {upload_id!r} is complete; its import job owns it (cancel the job)")
    await to_thread.run_sync(svc.uploads.discard, record)


COMPLETE = {**NOT_FOUND, 409: {"description": "a file is missing parts or has another size than declared"}}


@checkpoint_router.post("/{upload_id}/complete", status_code=202, response_model=JobOut, responses=COMPLETE)
async def complete_checkpoint_upload(upload_id: str, svc: Svc, team: Team) -> JobOut:
    """Every file arrived whole: submit the import job (hashes, checkpoint checks, commit)."""
    return await _complete(svc, team, upload_id, "checkpoint")


@dataset_router.post("/{upload_id}/complete", status_code=202, response_model=JobOut, responses=COMPLETE)
async def complete_dataset_upload(upload_id: str, svc: Svc, team: Team) -> JobOut:
    """The file arrived whole: submit the import job (hash, every line checked, commit)."""
    return await _complete(svc, team, upload_id, "dataset")


@checkpoint_router.delete("/{upload_id}", status_code=204, responses=NOT_FOUND)
async def abort_checkpoint_upload(upload_id: str, svc: Svc, team: Team) -> None:
    """Abandon an upload: its parts and files are deleted from the store."""
    await _abort(svc, team, upload_id, "checkpoint")


@dataset_router.delete("/{upload_id}", status_code=204, responses=NOT_FOUND)
async def abort_dataset_upload(upload_id: str, svc: Svc, team: Team) -> None:
    await _abort(svc, team, upload_id, "dataset")
