"""Direct uploads: clients put checkpoint files straight into the object store.

The gateway only signs: ``open`` records the declared files (path, size, sha256) under
``uploads/<team>/<id>/upload.json`` and returns presigned ``PUT`` URLs (one per part for large
files); the bytes go to ``uploads/<team>/<id>/files/<path>``. ``finish`` completes the store's
multipart uploads and checks every size; an import job then verifies the sha256s, checks the
checkpoint and commits it like any upload, and ``discard`` removes the staging area. Uploads
never finished are aborted by ``expire`` (the gateway's reaper) once their URLs have expired.
Records live in the object store, so any gateway replica can serve any step.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass

from .base import DirectUpload, ObjectNotFound, ObjectStore, StorageError
from .checkpoints import check_name

PREFIX = "uploads"
RECORD = "upload.json"


class UploadNotFound(StorageError, KeyError):
    pass


class UploadIncomplete(StorageError):
    """A declared file is missing parts or has another size than declared; the message names it."""


@dataclass(frozen=True)
class DeclaredFile:
    path: str
    size: int
    sha256: str


class UploadSessions:
    def __init__(self, store: ObjectStore):
        self.store = store

    def _base(self, team: str, upload_id: str) -> str:
        return f"{PREFIX}/{check_name(team, 'team')}/{check_name(upload_id, 'upload id')}/"

    def staging_key(self, team: str, upload_id: str, path: str) -> str:
        return self._base(team, upload_id) + "files/" + path

    def open(self, team: str, name: str, files: list[DeclaredFile], ttl_s: int, target: str = "checkpoint") -> dict:
        """Sign every file's upload; returns the record (with each file's part URLs). ``target``:
        what the files become (a ``checkpoint`` directory, or a ``dataset``'s one JSONL file)."""
        upload_id = secrets.token_hex(12)
        now = time.time()
        entries = []
        try:
            for f in files:
                up = self.store.start_direct_upload(self.staging_key(team, upload_id, f.path), f.size, ttl_s)
                entries.append({**asdict(f), **asdict(up)})
        except BaseException:
            for e in entries:
                self.store.abort_direct_upload(_upload(e))
            raise
        record = {"id": upload_id, "team": team, "name": name, "target": target, "created_at": now,
                  "expires_at": now + ttl_s, "files": entries}
        self.store.put_bytes(self._base(team, upload_id) + RECORD, json.dumps(record).encode())
        return record

    def get(self, team: str, upload_id: str) -> dict:
        try:
            return json.loads(self.store.get_bytes(self._base(team, upload_id) + RECORD))
        except (ObjectNotFound, ValueError):
            raise UploadNotFound(upload_id) from None

    def finish(self, record: dict) -> None:
        """Complete each file's multipart upload and check its stored size against the declared one."""
        for e in record["files"]:
            try:
                self.store.finish_direct_upload(_upload(e))
                size = self.store.size(e["key"])
            except ObjectNotFound:
                raise UploadIncomplete(f"{e['path']} was not uploaded; PUT it to its URL, then complete") from None
            except StorageError:
                raise UploadIncomplete(f"{e['path']}: not every part was uploaded; PUT each part, then complete") \
                    from None
            if size != e["size"]:
                raise UploadIncomplete(f"{e['path']} is {size} bytes in the store but was declared as {e['size']}")

    def keep(self, record: dict, ttl_s: int) -> dict:
        """Mark the upload complete and keep its files ``ttl_s`` more for the import job."""
        record = {**record, "completed_at": time.time(), "expires_at": time.time() + ttl_s}
        self.store.put_bytes(self._base(record["team"], record["id"]) + RECORD, json.dumps(record).encode())
        return record

    def discard(self, record: dict) -> None:
        """Abort and delete everything of an upload (its files, parts and record)."""
        for e in record["files"]:
            self.store.abort_direct_upload(_upload(e))
        self.store.delete_prefix(self._base(record["team"], record["id"]))

    def expire(self, now: float | None = None) -> list[str]:
        """Discard every upload whose URLs have expired; returns their ids."""
        now = time.time() if now is None else now
        gone = []
        for o in list(self.store.list(PREFIX + "/")):
            if not o.key.endswith("/" + RECORD):
                continue
            try:
                record = json.loads(self.store.get_bytes(o.key))
            except (ObjectNotFound, ValueError):
                continue
            if record.get("expires_at", 0) < now:
                self.discard(record)
                gone.append(record["id"])
        return gone


def _upload(entry: dict) -> DirectUpload:
    return DirectUpload(entry["key"], entry["upload_id"], entry["part_size"], tuple(entry["urls"]))


def granted(prefixes, uri: str) -> bool:
    """Whether ``uri`` lies under one of the granted ``s3://bucket/prefix/`` URIs (whole components)."""
    if not uri.startswith("s3://") or ".." in uri.split("/"):
        return False
    for p in prefixes:
        base = p if p.endswith("/") else p + "/"
        if uri == p.rstrip("/") or uri.startswith(base):
            return True
    return False
