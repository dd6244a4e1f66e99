"""Checkpoints API: upload an HF checkpoint directory, list, get, download files."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, File, HTTPException, Path as PathParam, Query, UploadFile
from fastapi.responses import StreamingResponse

from gateway.api.deps import Svc
from gateway.api.schemas import CheckpointList, CheckpointOut, Name
from gateway.auth import Team
from shared.config import ModelConfig, UnsupportedModelError
from shared.storage import CheckpointExists, CheckpointNotFound

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])
NOT_FOUND = {404: {"description": "no such checkpoint for this team"}}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def ckpt_out(m: dict) -> CheckpointOut:
    st = m["storage"]
    return CheckpointOut(name=st["name"], format=m.get("format"), committed_at=st["committed_at"], bytes=st["bytes"],
                         files=st["files"], layout=m.get("layout"), dtype=m.get("dtype"),
                         model=m.get("model") or m.get("hf_config"), parity=m.get("parity"),
                         provenance=m.get("provenance"), service=m.get("service"))


def _safe_rel(name: str | None) -> str:
    rel = PurePosixPath((name or "").replace("\\", "/"))
    if not name or rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts) or len(rel.parts) > 4:
        raise HTTPException(422, f"invalid file name {name!r}: send relative paths like `config.json` or `sub/file`")
    return rel.as_posix()


def _check_hf_dir(d: Path) -> dict:
    if not (d / "config.json").is_file():
        raise HTTPException(422, "an HF checkpoint needs config.json (plus weights and tokenizer files)")
    try:
        raw = json.loads((d / "config.json").read_text())
        ModelConfig.from_hf(raw)
    except (ValueError, UnsupportedModelError, KeyError, TypeError) as e:
        raise HTTPException(422, f"config.json is not a supported Llama-family config: {e}") from None
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in d.iterdir()):
        raise HTTPException(422, "no weight files (*.safetensors, *.bin, *.pth) in the upload")
    return raw


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
        seen = set()
        for f in files:
            rel = _safe_rel(f.filename)
            if rel in seen:
                raise HTTPException(422, f"file {rel!r} sent twice")
            seen.add(rel)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(dst, "wb") as out:
                while chunk := await f.read(1 << 20):
                    out.write(chunk)
        raw = await to_thread.run_sync(_check_hf_dir, tmp)
        meta = {"format": "hf", "hf_config": raw, "service": {"uploaded_at": time.time(), "team": team}}
        try:
            m = await to_thread.run_sync(lambda: svc.checkpoints.commit(team, name, tmp, meta=meta))
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


@router.get("/{name}/files/{path:path}", responses={**NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}})
async def download_file(name: Name, path: Annotated[str, PathParam(max_length=1000)], svc: Svc, team: Team):
    """One file, streamed and verified against its sha256 (sent as X-Checksum-SHA256)."""
    m = await _manifest(svc, team, name)
    info = m["storage"]["files"].get(path)
    if info is None:
        raise HTTPException(404, f"checkpoint {name!r} has no file {path!r}")
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
