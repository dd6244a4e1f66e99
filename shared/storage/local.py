"""Local-directory object store (the embedded default)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .base import ObjectInfo, ObjectNotFound, ObjectStore, check_key

_TMP = ".tmp"


class LocalStore(ObjectStore):
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        (self.root / _TMP).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic(self, key: str, write) -> None:
        # Write beside the root then rename: a reader never sees a half-written object.
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / _TMP / uuid.uuid4().hex
        try:
            write(tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        self._atomic(key, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda tmp: tmp.write_bytes(data))

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

        def gen():
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return gen()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return iter(())
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) == self.root and d == _TMP)]
            for name in filenames:
                p = Path(dirpath) / name
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, p.stat().st_size))
        return iter(sorted(out, key=lambda o: o.key))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def ping(self) -> None:
        if not self.root.is_dir():
            raise ObjectNotFound(str(self.root))
