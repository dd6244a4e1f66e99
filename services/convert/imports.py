"""Import jobs: an HF checkpoint (or a JSONL dataset) enters the store without passing through the gateway.

From a completed direct upload (the declared sha256 of every file is checked here, where the
bytes are read anyway) or by copying an S3 prefix the team was granted. Either way the files
land in the job's own directory, pass the same checks as a gateway upload
(``shared.checkpoint.upload.check_hf_dir``) and are committed like one.
"""

from __future__ import annotations

import time
from pathlib import Path

from services.worker import ChildContext, Job, Output, commit_output
from shared.checkpoint.upload import BadUpload, check_file_list, check_hf_dir, upload_meta
from shared.files import sha256_file
from shared.progress import bytes_progress
from shared.storage import DATASET_FILE, CheckpointStore, IntegrityError, dataset_store
from shared.specs.records import DataError, check_jsonl
from shared.storage.uploads import UploadSessions, granted


class ImportRefused(ValueError):
    """The import names a source the team may not read, or one this store cannot reach."""


def run_import(job: Job, ctx: ChildContext, *, grants: list[str]) -> dict:
    """Fetch, verify, check and commit (``commit_output``); returns the job's result. A direct
    upload's session is discarded once its files are committed or refused."""
    dataset = job.params.get("target") == "dataset"
    store = dataset_store(ctx.checkpoints.store) if dataset else ctx.checkpoints
    sessions = UploadSessions(ctx.checkpoints.store)
    used: list[dict] = []  # the upload session read by this attempt, if any
    try:
        result = commit_output(ctx, job.params["output"], lambda: _imported(job, ctx, sessions, used, grants, dataset),
                               store=store, source_manifest=False)
    except (BadUpload, IntegrityError, DataError):
        for record in used:
            sessions.discard(record)  # the upload cannot become a checkpoint: nothing is kept
        raise
    for record in used:
        sessions.discard(record)
    return result


def _imported(job: Job, ctx: ChildContext, sessions: UploadSessions, used: list[dict], grants: list[str],
              dataset: bool) -> Output:
    dest = ctx.workdir / "source"
    if job.params.get("upload"):
        used.append(sessions.get(job.team, job.params["upload"]))
        _fetch_upload(sessions, used[0], dest, ctx.progress)
        where = {"upload": used[0]["id"]}
    else:
        _fetch_granted(ctx.checkpoints, job.params["uri"], grants, dest, ctx.progress,
                       single=DATASET_FILE if dataset else None)
        where = {"imported_from": job.params["uri"]}
    meta = _dataset_meta(dest, job.params["output"]) if dataset else upload_meta(check_hf_dir(dest), job.team)
    meta["service"] = {**meta.get("service", {}), **where}
    return Output(dest, meta)


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
        progress(bytes_progress("fetch", done, total))


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
        progress(bytes_progress("fetch", done, total))
