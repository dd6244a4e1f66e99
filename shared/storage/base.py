"""The object-store interface: flat keys ("a/b/c"), whole-object atomic writes."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_KEY = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")


class StorageError(Exception):
    """The object store failed or holds something unexpected."""


class ObjectNotFound(StorageError, KeyError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class DirectTransferUnsupported(StorageError):
    """This store cannot hand out URLs for clients to move bytes themselves (a local directory)."""


@dataclass(frozen=True)
class DirectUpload:
    """Where a client sends one object's bytes itself: one presigned ``PUT`` URL per part, in
    order (``upload_id`` is the store's multipart upload; ``None`` for a single ``PUT``)."""
    key: str
    upload_id: str | None
    part_size: int
    urls: tuple[str, ...]


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated, without '..' or empty parts (no escaping the root)."""
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: use letters, digits, '.', '_', '-' separated by '/'")
    return key


class ObjectStore(ABC):
    """A PUT of one object is atomic: readers see the old object, the new one, or none."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects under ``prefix`` (recursive), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        for k in keys:
            self.delete(k)
        return len(keys)

    def list_dirs(self, prefix: str) -> list[str]:
        """Immediate child "directories" of ``prefix`` (which ends with '/')."""
        seen = set()
        for o in self.list(prefix):
            rest = o.key[len(prefix):]
            if "/" in rest:
                seen.add(rest.split("/", 1)[0])
        return sorted(seen)

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        self.exists("ping-probe")

    # ---- direct transfers (clients move the bytes; the service only signs) ----
    def size(self, key: str) -> int:
        for o in self.list(key):
            if o.key == key:
                return o.size
        raise ObjectNotFound(key)

    def presign_get(self, key: str, expires_s: int) -> str:
        raise DirectTransferUnsupported("this object store cannot sign download URLs")

    def start_direct_upload(self, key: str, size: int, expires_s: int) -> DirectUpload:
        raise DirectTransferUnsupported("this object store cannot sign upload URLs")

    def finish_direct_upload(self, upload: DirectUpload) -> None:
        """Make the uploaded parts the object (raises StorageError if parts are missing)."""
        raise DirectTransferUnsupported("this object store cannot sign upload URLs")

    def abort_direct_upload(self, upload: DirectUpload) -> None:
        raise DirectTransferUnsupported("this object store cannot sign upload URLs")
