"""Writing safetensors files as a stream: the layout is fixed up front, tensors arrive in order.

``StreamingSafetensorsWriter`` lays out a file from known shapes, writes the header first and
each tensor as it arrives, hashing as it goes; finished stretches go to the disk while the
rest is still being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from concurrent.futures import Executor
from pathlib import Path
from typing import Mapping, Sequence

import torch

from shared.checkpoint.staging import disk_error
from shared.checkpoint.tensors import ST_NAMES
from shared.files import MappedFile, copy_range, start_writeback

_WRITEBACK_BYTES = 8 << 20
_DURABLE_BYTES = 64 << 20


def _datasync(fd: int) -> None:
    with contextlib.suppress(OSError):  # a real failure shows at the final fsync
        os.fdatasync(fd)



def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in row-major order (no copy when it is already contiguous)."""
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


class StreamingSafetensorsWriter:
    """A safetensors file whose layout is fixed up front; tensors are added in that order.

    The header is written at once from the declared (name, shape, dtype) list, so tensors can
    be streamed without holding the file's contents. ``add`` writes and hashes in the calling
    thread; a pipelined caller uses ``place`` (check and lay out a tensor given as pieces),
    then ``write_at`` and ``hash`` from threads of its own - writes go to fixed offsets, and
    hashing must follow the file's order.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None, syncer: Executor | None = None) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._order: list[str] = []
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        for name, shape, dt in entries:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            header[name] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append(name)
            self._specs[name] = (tuple(shape), dt, offset)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._base = 8 + len(raw)
        self.nbytes = self._base + offset
        self._next = 0
        self._synced = 0  # bytes before this offset have been handed to the disk
        self._durable = 0  # ... and before this one, synced
        self._syncer = syncer
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        head = struct.pack("<Q", len(raw)) + raw
        self.write_at(head, 0)
        self.hash(head)

    def place(self, name: str, pieces: Sequence[torch.Tensor]) -> list[tuple[memoryview, int, tuple[int, int] | None]]:
        """Check the next tensor (given as pieces whose dim-0 concatenation it is) against the
        declared layout; returns each piece's bytes, its offset in this file and, where the
        bytes are a mapped range of a source file, that (fd, offset) for a kernel copy."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"{self.path.name}: got tensor {name!r}, expected {expected!r}")
        shape, dt, offset = self._specs[name]
        rows = sum(p.shape[0] if p.dim() else 1 for p in pieces)
        got = (rows, *pieces[0].shape[1:]) if pieces[0].dim() else ()
        if got != shape or any(p.dtype != dt for p in pieces):
            raise RuntimeError(f"{self.path.name}: {name} is {got} {pieces[0].dtype}, declared {shape} {dt}")
        out, at = [], self._base + offset
        for p in pieces:
            data = as_bytes(p)
            out.append((data, at, MappedFile.locate(p.data_ptr(), data.nbytes) if p.is_contiguous() else None))
            at += data.nbytes
        self._next += 1
        return out

    def add(self, name: str, tensor: torch.Tensor | Sequence[torch.Tensor]) -> None:
        for data, at, source in self.place(name, [tensor] if isinstance(tensor, torch.Tensor) else tensor):
            self.write_at(data, at, source)
            self.hash(data)

    def write_at(self, data, offset: int, source: tuple[int, int] | None = None) -> None:
        """Write ``data`` at ``offset``; copied in the kernel from ``source`` (fd, offset) when given."""
        view, done = memoryview(data).cast("B"), 0
        try:
            if source is None or not copy_range(source[0], source[1], self._fd, offset, view.nbytes):
                while done < view.nbytes:
                    done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            raise disk_error(e, self.path) from e
        # hand finished stretches to the disk as we go (whole MiBs: a page still being filled
        # would be written twice, and rewriting a page under writeback waits for the disk)
        end = (offset + view.nbytes) & ~((1 << 20) - 1)
        if end - self._synced >= _WRITEBACK_BYTES:
            start_writeback(self._fd, self._synced, end - self._synced)
            self._synced = end
            if self._syncer is not None and end - self._durable >= _DURABLE_BYTES:
                # make it durable now, on another thread, so the sync at close has less to flush
                self._durable = end
                self._syncer.submit(_datasync, self._fd)

    def hash(self, data) -> None:
        self._hash.update(data)

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def digest(self) -> str:
        """The sha256 of everything hashed so far (the whole file once complete)."""
        return self._hash.hexdigest()

    def close(self) -> str:
        """Finish the file (on disk, fsynced); returns its sha256."""
        if not self.complete:
            raise RuntimeError(f"{self.path.name}: closed after {self._next} of {len(self._order)} tensors")
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise disk_error(e, self.path) from e
        finally:
            self.abort()
        return self._hash.hexdigest()

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

