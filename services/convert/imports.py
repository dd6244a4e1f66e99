"""Import jobs: an HF checkpoint (or a JSONL dataset) enters the store without passing through the gateway.

From a completed direct upload (the declared sha256 of every file is checked here, where the
bytes are read anyway) or by copying an S3 prefix the team was granted. Either way the files
land in the job's own directory, pass the same checks as a gateway upload
(``shared.checkpoint.upload.check_hf_dir``) and are committed like one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from shared.checkpoint.upload import BadUpload, check_file_list, check_hf_dir, upload_meta
from shared.files import sha256_file
from shared.storage import DATASET_FILE, CheckpointStore, IntegrityError, dataset_store
from shared.training.records import DataError, check_jsonl
from shared.storage.uploads import UploadSessions, granted


class ImportRefused(ValueError):
    """The import names a source the team may not read, or one this store cannot reach."""


def run_import(params: dict, *, team: str, job_id: str, checkpoints: CheckpointStore, workdir: Path,
               grants: list[str], progress: Callable[[dict], None]) -> dict:
    """Fetch, verify, check and commit; returns the committed manifest."""
    out, dataset = params["output"], params.get("target") == "dataset"
    store = dataset_store(checkpoints.store) if dataset else checkpoints
    if store.exists(team, out):
        m = store.manifest(team, out)
        if m.get("service", {}).get("job_id") == job_id:  # an earlier attempt committed it
            return m
    dest = workdir / "source"
    sessions = UploadSessions(checkpoints.store)
    record = sessions.get(team, params["upload"]) if params.get("upload") else None
    try:
        if record is not None:
            _fetch_upload(sessions, record, dest, progress)
            where = {"upload": record["id"]}
        else:
            _fetch_granted(checkpoints, params["uri"], grants, dest, progress, single=DATASET_FILE if dataset else None)
            where = {"imported_from": params["uri"]}
        meta = _dataset_meta(dest, out) if dataset else upload_meta(check_hf_dir(dest), team)
        meta["service"] = {**meta.get("service", {}), "team": team, "job_id": job_id, **where}
        manifest = store.commit(team, out, dest, meta=meta)
    except (BadUpload, IntegrityError, DataError):
        if record is not None:
            sessions.discard(record)  # the upload cannot become a checkpoint: nothing is kept
        raise
    if record is not None:
        sessions.discard(record)
    return manifest


def _fetch_upload(sessions: UploadSessions, record: dict, dest: Path, progress) -> None:
    total = sum(f["size"] for f in record["files"])
    done = 0
    for f in record["files"]:
        path = dest / f["path"]
        sessions.store.get_file(f["key"], path)
        digest = sha256_file(path)
        if digest != f["sha256"]:
            raise IntegrityError(f"{f['path']}: its sha256 is {digest}, but {f['sha256']} was declared; "
                                 "upload it again")
        done += f["size"]
        progress({"phase": "fetch", "current": done, "total": total, "unit": "bytes"})


def _dataset_meta(dest: Path, name: str) -> dict:
    records = check_jsonl(dest / DATASET_FILE, name)
    return {"format": "jsonl", "dataset": {"records": records}, "service": {"uploaded_at": time.time()}}


def _fetch_granted(checkpoints: CheckpointStore, uri: str, grants: list[str], dest: Path, progress,
                   single: str | None = None) -> None:
    """Copy the objects under a granted ``s3://bucket/prefix/`` into ``dest`` (with ``single``:
    the one object ``uri`` names, as that file name)."""
    if not granted(grants, uri):
        raise ImportRefused(f"the team may not import from {uri}; an operator grants prefixes (LLAMA_SVC_IMPORT_GRANTS)")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not hasattr(checkpoints.store, "for_bucket"):
        raise ImportRefused("imports from s3:// need the service's store to be S3 (LLAMA_SVC_STORAGE_URL=s3://...)")
    source = checkpoints.store.for_bucket(bucket)
    if single is not None:
        source.get_file(prefix, dest / single)
        return
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    objects = [o for o in source.list(prefix) if not o.key.endswith("/")]
    if not objects:
        raise BadUpload(f"{uri} holds no files")
    rels = check_file_list(o.key[len(prefix):] for o in objects)
    total, done = sum(o.size for o in objects), 0
    for o, rel in zip(objects, rels):
        source.get_file(o.key, dest / rel)
        done += o.size
        progress({"phase": "fetch", "current": done, "total": total, "unit": "bytes"})
