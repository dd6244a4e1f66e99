"""Checkpoints API: upload an HF checkpoint directory, list, get, download files."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, File, HTTPException, Path as PathParam, Query, UploadFile
from fastapi.responses import RedirectResponse, StreamingResponse

from gateway.api.deps import Svc
from gateway.api.schemas import CheckpointList, CheckpointOut, Name
from gateway.auth import Team
from shared.checkpoint.upload import BadUpload, check_file_list, check_hf_dir, upload_meta
from shared.storage import CheckpointExists, CheckpointNotFound
from shared.storage.base import DirectTransferUnsupported

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])
NOT_FOUND = {404: {"description": "no such checkpoint for this team"}}


def ckpt_out(m: dict) -> CheckpointOut:
    st = m["storage"]
    return CheckpointOut(name=st["name"], format=m.get("format"), committed_at=st["committed_at"], bytes=st["bytes"],
                         files=st["files"], layout=m.get("layout"), dtype=m.get("dtype"),
                         model=m.get("model") or m.get("hf_config"), parity=m.get("parity"),
                         provenance=m.get("provenance"), service=m.get("service"))


@router.post("", status_code=201, response_model=CheckpointOut, responses={
    409: {"description": "a checkpoint of this name exists"}, 413: {"description": "upload too large"}})
async def upload_checkpoint(svc: Svc, team: Team, name: Annotated[Name, Query()],
                            files: Annotated[list[UploadFile], File(description="the files of an HF checkpoint "
                                                                    "directory; each file name is its relative path")]):
    """Upload an HF checkpoint directory (multipart). It becomes visible once fully stored."""
    if await to_thread.run_sync(svc.checkpoints.exists, team, name):
        raise HTTPException(409, f"checkpoint {name!r} already exists; choose another name")
    tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=svc.settings.data_dir))
    try:
        try:
            rels = check_file_list(f.filename for f in files)
        except BadUpload as e:
            raise HTTPException(422, str(e)) from None
        for f, rel in zip(files, rels):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(dst, "wb") as out:
                while chunk := await f.read(1 << 20):
                    out.write(chunk)
        try:
            raw = await to_thread.run_sync(check_hf_dir, tmp)
        except BadUpload as e:
            raise HTTPException(422, str(e)) from None
        try:
            m = await to_thread.run_sync(lambda: svc.checkpoints.commit(team, name, tmp, meta=upload_meta(raw, team)))
        except CheckpointExists as e:
            raise HTTPException(409, str(e)) from None
        return ckpt_out(m)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@router.get("", response_model=CheckpointList)
async def list_checkpoints(svc: Svc, team: Team) -> CheckpointList:
    return CheckpointList(checkpoints=[ckpt_out(m) for m in await to_thread.run_sync(svc.checkpoints.list, team)])


async def _manifest(svc, team: str, name: str) -> dict:
    try:
        return await to_thread.run_sync(svc.checkpoints.manifest, team, name)
    except CheckpointNotFound:
        raise HTTPException(404, f"checkpoint {name!r} not found") from None


@router.get("/{name}", response_model=CheckpointOut, responses=NOT_FOUND)
async def get_checkpoint(name: Name, svc: Svc, team: Team) -> CheckpointOut:
    """Manifest, parity report and provenance."""
    return ckpt_out(await _manifest(svc, team, name))


@router.get("/{name}/manifest", responses=NOT_FOUND)
async def get_manifest(name: Name, svc: Svc, team: Team) -> dict:
    return await _manifest(svc, team, name)


@router.get("/{name}/files/{path:path}", responses={
    **NOT_FOUND, 200: {"content": {"application/octet-stream": {}}},
    307: {"description": "where the object store serves the file itself (a presigned URL)"}})
async def download_file(name: Name, path: Annotated[str, PathParam(max_length=1000)], svc: Svc, team: Team,
                        redirect: bool = Query(True, description="let the object store serve the bytes when it can")):
    """One file, verified against its sha256 (sent as X-Checksum-SHA256): a redirect to the
    object store where it can sign URLs, else streamed through the gateway."""
    m = await _manifest(svc, team, name)
    info = m["storage"]["files"].get(path)
    if info is None:
        raise HTTPException(404, f"checkpoint {name!r} has no file {path!r}")
    if redirect:
        key = svc.checkpoints.key(team, name, path)
        try:
            url = await to_thread.run_sync(svc.checkpoints.store.presign_get, key, svc.settings.download_url_ttl_s)
            return RedirectResponse(url, status_code=307, headers={"X-Checksum-SHA256": info["sha256"]})
        except DirectTransferUnsupported:
            pass
    it = await to_thread.run_sync(svc.checkpoints.iter_file, team, name, path)

    async def body():
        while True:
            chunk = await to_thread.run_sync(next, it, None)
            if chunk is None:
                return
            yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream", headers={
        "Content-Length": str(info["size"]), "X-Checksum-SHA256": info["sha256"],
        "Content-Disposition": f'attachment; filename="{PurePosixPath(path).name}"'})


@router.delete("/{name}", status_code=204, responses=NOT_FOUND)
async def delete_checkpoint(name: Name, svc: Svc, team: Team) -> None:
    await _manifest(svc, team, name)
    await to_thread.run_sync(svc.checkpoints.delete, team, name)
