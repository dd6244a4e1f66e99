"""Object storage: one interface, a local-directory backend and an S3-API backend."""

from __future__ import annotations

from pathlib import Path

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError
from .checkpoints import (MANIFEST, CheckpointExists, CommitCancelled, CheckpointNotFound, CheckpointStore, IntegrityError,
                          check_name, sha256_file)
from .datasets import DATASET_FILE, METRICS_ARTIFACT, artifact_key, dataset_store
from .local import LocalStore


def open_store(url: str) -> ObjectStore:
    """``file:///abs/dir`` (or a plain path) -> LocalStore; ``s3://KEY:SECRET@host:port/bucket`` -> S3Store."""
    if url.startswith("s3://"):
        from .s3 import S3Store

        return S3Store.from_url(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise ValueError(f"unsupported storage URL {url!r}: use file:///dir or s3://KEY:SECRET@host:port/bucket")
    return LocalStore(Path(url))


__all__ = ["ObjectStore", "ObjectInfo", "ObjectNotFound", "StorageError", "LocalStore", "open_store",
           "CheckpointStore", "CheckpointNotFound", "CheckpointExists", "CommitCancelled", "IntegrityError", "MANIFEST",
           "check_name", "sha256_file", "DATASET_FILE", "METRICS_ARTIFACT", "artifact_key", "dataset_store"]
