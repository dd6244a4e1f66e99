"""Checkpoints in an object store: committed by writing ``manifest.json`` last.

Layout: ``checkpoints/<team>/<name>/<relative file path>``. A checkpoint exists once its
manifest exists; files without a manifest are the leftovers of an interrupted commit and are
invisible (and replaced by the next commit of that name). The manifest lists every file with
its size and sha256 under ``storage.files``; fetching verifies each one.

Manifests are written by the service only: a ``manifest.json`` in the source directory is
refused unless the caller vouches for it (``source_manifest=True``: a native checkpoint the
converter or the trainer wrote), in which case its content is kept and the storage section is
added beside it.

Garbage: a commit that raises deletes what it uploaded. A commit whose process died midway
cannot, so each commit first writes a lease (``.commit``, holding its start time, renewed while
it uploads); ``collect_garbage`` deletes every prefix that has no manifest and whose lease is
old or missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from shared.files import sha256_file

from .base import ObjectNotFound, ObjectStore, StorageError

log = logging.getLogger("llama_svc.storage")

MANIFEST = "manifest.json"
LEASE = ".commit"
LEASE_RENEW_S = 60.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


class IntegrityError(StorageError):
    """A fetched file does not match the sha256 its manifest lists."""


class CheckpointNotFound(StorageError, KeyError):
    pass


class CheckpointExists(StorageError):
    pass


class CommitCancelled(StorageError):
    """The commit was stopped by its caller; nothing became visible."""


def check_name(name: str, what: str = "checkpoint name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def _source_files(src: Path, source_manifest: bool) -> tuple[list[Path], dict]:
    """The files to upload (all but the manifest) and the source manifest to keep, if vouched for."""
    if (src / LEASE).exists():
        raise ValueError(f"a checkpoint may not contain a file named {LEASE!r} (the service uses that name)")
    if (src / MANIFEST).exists() and not source_manifest:
        raise ValueError(f"the checkpoint directory contains {MANIFEST!r}; manifests are written by the service, "
                         f"remove that file and commit again")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.relative_to(src).as_posix() != MANIFEST)
    if not files:
        raise ValueError(f"{src.name or src} holds no files to commit")
    base = json.loads((src / MANIFEST).read_text()) if (src / MANIFEST).is_file() else {}
    if not isinstance(base, dict):
        raise ValueError(f"the source {MANIFEST} is not a JSON object")
    return files, base


def _listed_hashes(manifest: dict) -> dict[str, str]:
    """sha256 per file as a converter manifest may list them: a list of {path, sha256} or a map."""
    files = manifest.get("files")
    out = {}
    if isinstance(files, list):
        for f in files:
            if isinstance(f, dict) and "sha256" in f and ("path" in f or "name" in f):
                out[f.get("path") or f["name"]] = f["sha256"]
    elif isinstance(files, dict):
        for k, v in files.items():
            sha = v.get("sha256") if isinstance(v, dict) else v
            if isinstance(sha, str):
                out[k] = sha
    return out


class CheckpointStore:
    def __init__(self, store: ObjectStore, prefix: str = "checkpoints"):
        self.store = store
        self.prefix = prefix

    def key(self, team: str, name: str, rel: str = "") -> str:
        """The object key of ``rel`` in ``team/name`` (also for presigned downloads)."""
        return f"{self.prefix}/{check_name(team, 'team')}/{check_name(name)}/{rel}"

    _key = key

    # ---- writing ----
    def commit(self, team: str, name: str, src: Path, *, meta: dict | None = None, source_manifest: bool = False,
               progress: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> dict:
        """Upload every file under ``src`` then the manifest; return the stored manifest.

        ``source_manifest=True``: ``src/manifest.json`` was written by the converter or trainer
        and is kept (its listed sha256s are checked); otherwise a ``manifest.json`` is refused.
        On any exception, the objects this commit put are deleted.
        """
        src = Path(src)
        if self.exists(team, name):
            raise CheckpointExists(f"checkpoint {name!r} already exists; choose another name or delete it first")
        files, base = _source_files(src, source_manifest)
        self.store.delete_prefix(self._key(team, name))  # leftovers of an interrupted commit
        lease, put, started = self._key(team, name, LEASE), [], time.time()
        self._write_lease(lease, started)
        try:
            entries, total = self._upload(team, name, src, files, _listed_hashes(base), put, started, progress,
                                          should_cancel)
            manifest = {**base, **(meta or {})}
            manifest["storage"] = {"team": team, "name": name, "committed_at": time.time(),
                                   "files": entries, "bytes": total}
            put.append(self._key(team, name, MANIFEST))
            self.store.put_bytes(put[-1], json.dumps(manifest, indent=2).encode())
        except BaseException:
            self._undo(put, lease)
            raise
        self.store.delete(lease)
        return manifest

    def _upload(self, team: str, name: str, src: Path, files: list[Path], listed: dict, put: list[str],
                started: float, progress, should_cancel) -> tuple[dict, int]:
        entries, total, done = {}, sum(p.stat().st_size for p in files), 0
        lease, renewed = self._key(team, name, LEASE), time.time()
        for p in files:
            if should_cancel is not None and should_cancel():
                raise CommitCancelled(f"commit of {name!r} cancelled before its manifest; nothing is visible")
            rel = p.relative_to(src).as_posix()
            digest = sha256_file(p)
            if rel in listed and listed[rel] != digest:
                raise IntegrityError(f"{rel}: sha256 {digest} differs from the source manifest's {listed[rel]}")
            put.append(self._key(team, name, rel))
            self.store.put_file(put[-1], p)
            entries[rel] = {"size": p.stat().st_size, "sha256": digest}
            done += p.stat().st_size
            if progress:
                progress(done, total)
            if time.time() - renewed > LEASE_RENEW_S:
                renewed = time.time()
                self._write_lease(lease, started)
        return entries, total

    def _write_lease(self, key: str, started: float) -> None:
        body = {"started_at": started, "renewed_at": time.time(), "pid": os.getpid()}
        self.store.put_bytes(key, json.dumps(body).encode())

    def _undo(self, put: list[str], lease: str) -> None:
        """Delete what a failed commit put (the manifest first); the lease last, so that what is
        left after a failure here is still collected as garbage."""
        try:
            for key in reversed(put):
                self.store.delete(key)
            self.store.delete(lease)
        except Exception as e:
            log.warning("could not remove the objects of a failed commit (%s); garbage collection will", e)

    def collect_garbage(self, older_than_s: float) -> list[str]:
        """Delete every checkpoint prefix without a manifest whose commit lease is older than
        ``older_than_s`` (or missing): what commits killed midway left. Returns "team/name"s."""
        groups: dict[str, set[str]] = {}
        root = f"{self.prefix}/"
        for o in self.store.list(root):
            parts = o.key[len(root):].split("/", 2)
            if len(parts) == 3:
                groups.setdefault(f"{parts[0]}/{parts[1]}", set()).add(parts[2])
        removed = []
        for ckpt, rels in sorted(groups.items()):
            if MANIFEST in rels:
                continue
            base = f"{root}{ckpt}/"
            if self._fresh(base, older_than_s):  # re-read: a commit may have started since the listing
                continue
            self.store.delete_prefix(base)
            removed.append(ckpt)
        return removed

    def _fresh(self, base: str, older_than_s: float) -> bool:
        """Committed meanwhile, or the commit lease was renewed less than ``older_than_s`` ago."""
        if self.store.exists(base + MANIFEST):
            return True
        try:
            lease = json.loads(self.store.get_bytes(base + LEASE))
            renewed = float(lease.get("renewed_at") or lease.get("started_at") or 0)
        except (ObjectNotFound, ValueError, TypeError, AttributeError):
            return False
        return time.time() - renewed < older_than_s

    def delete(self, team: str, name: str) -> None:
        # Manifest first: the checkpoint disappears atomically, then its files go.
        self.store.delete(self._key(team, name, MANIFEST))
        self.store.delete_prefix(self._key(team, name))

    # ---- reading ----
    def exists(self, team: str, name: str) -> bool:
        return self.store.exists(self._key(team, name, MANIFEST))

    def manifest(self, team: str, name: str) -> dict:
        try:
            return json.loads(self.store.get_bytes(self._key(team, name, MANIFEST)))
        except ObjectNotFound:
            raise CheckpointNotFound(name) from None

    def list(self, team: str) -> list[dict]:
        out = []
        for name in self.store.list_dirs(f"{self.prefix}/{check_name(team, 'team')}/"):
            try:
                out.append(self.manifest(team, name))
            except (CheckpointNotFound, ValueError):
                continue  # uncommitted
        return out

    def file_info(self, team: str, name: str, rel: str) -> dict:
        files = self.manifest(team, name)["storage"]["files"]
        if rel not in files:
            raise CheckpointNotFound(f"{name}/{rel}")
        return files[rel]

    def iter_file(self, team: str, name: str, rel: str) -> Iterator[bytes]:
        """Stream one file, raising IntegrityError at the end if its sha256 does not match."""
        info = self.file_info(team, name, rel)
        chunks = self.store.iter_chunks(self._key(team, name, rel))

        def gen():
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
                yield c
            if h.hexdigest() != info["sha256"]:
                raise IntegrityError(f"{name}/{rel}: sha256 mismatch")

        return gen()

    def fetch(self, team: str, name: str, dest: Path) -> Path:
        """Download into ``dest`` (verified); ``dest/manifest.json`` is written last.

        A ``dest`` that already holds the same committed manifest is reused as a cache.
        """
        dest = Path(dest)
        manifest = self.manifest(team, name)
        if (dest / MANIFEST).is_file() and json.loads((dest / MANIFEST).read_text()) == manifest:
            return dest
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        try:
            for rel, info in manifest["storage"]["files"].items():
                out = tmp / rel
                self.store.get_file(self._key(team, name, rel), out)
                digest = sha256_file(out)
                if digest != info["sha256"]:
                    raise IntegrityError(f"{name}/{rel}: sha256 {digest} does not match the manifest's {info['sha256']}")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest
