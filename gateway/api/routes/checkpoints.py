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
from shared.checkpoint.index import INDEX_FILES, BadIndex, read_index
from shared.paths import UnsafePath, check_relpath
from shared.storage import MANIFEST, CheckpointExists, CheckpointNotFound

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])
NOT_FOUND = {404: {"description": "no such checkpoint for this team"}}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


def ckpt_out(m: dict) -> CheckpointOut:
    st = m["storage"]
    return CheckpointOut(name=st["name"], format=m.get("format"), committed_at=st["committed_at"], bytes=st["bytes"],
                         files=st["files"], layout=m.get("layout"), dtype=m.get("dtype"),
                         model=m.get("model") or m.get("hf_config"), parity=m.get("parity"),
                         provenance=m.get("provenance"), service=m.get("service"))


def _safe_rel(name: str | None) -> str:
    """An uploaded part's file name as a relative path (``shared.paths.check_relpath``), else 422."""
    try:
        return check_relpath(name, "upload file name").as_posix()
    except UnsafePath as e:
        raise HTTPException(422, f"{e}; send relative paths like `config.json` or `sub/file`") from None


def _claim(rel: str, seen: dict[str, str]) -> None:
    """Note ``rel`` as a file and its parents as directories; refuse a repeat or a name that is both."""
    parts = rel.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    clash = rel if rel in seen else next((p for p in parents if seen.get(p) == "file"), None)
    if clash == rel and seen[rel] == "file":
        raise HTTPException(422, f"file {rel!r} sent twice")
    if clash is not None:
        raise HTTPException(422, f"{clash!r} is both a file and a directory in the upload; rename one of them")
    seen[rel] = "file"
    for p in parents:
        seen[p] = "dir"


def _read_config(path: Path) -> dict:
    """config.json as a JSON object of bounded size and depth, else 422."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise HTTPException(422, f"config.json is over {MAX_CONFIG_BYTES} bytes; an HF config is a few KB")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPException(422, "config.json is not UTF-8 text; save it as UTF-8 JSON") from None
    except RecursionError:
        raise HTTPException(422, f"config.json is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    except ValueError as e:
        raise HTTPException(422, f"config.json is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise HTTPException(422, f"config.json must be a JSON object ({{...}}), not a {type(raw).__name__}")
    if _depth(raw) > MAX_CONFIG_DEPTH:
        raise HTTPException(422, f"config.json is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)")
    return raw


def _depth(obj) -> int:
    """How many levels of objects and arrays a parsed JSON value has (iteratively: no recursion)."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, (dict, list))]
    return depth


def _check_hf_dir(d: Path) -> dict:
    if not (d / "config.json").is_file():
        raise HTTPException(422, "an HF checkpoint needs config.json (plus weights and tokenizer files)")
    raw = _read_config(d / "config.json")
    try:
        ModelConfig.from_hf(raw)
    except (ValueError, UnsupportedModelError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise HTTPException(422, f"config.json is not a supported Llama-family config: {e}") from None
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in d.iterdir()):
        raise HTTPException(422, "no weight files (*.safetensors, *.bin, *.pth) in the upload")
    for index in INDEX_FILES:  # the loaders check again (defence in depth)
        if (d / index).is_file():
            try:
                read_index(d / index)
            except BadIndex as e:
                raise HTTPException(422, f"{e}. Every shard named in the index must be a file of this upload") from None
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
        seen: dict[str, str] = {}
        for f in files:
            rel = _safe_rel(f.filename)
            if rel == MANIFEST:
                raise HTTPException(422, f"{MANIFEST} is written by the service (sizes, hashes, layout, parity); "
                                         "leave it out of the upload")
            _claim(rel, seen)
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
