"""Reading source tensors one at a time, and writing checkpoint directories safely.

Readers never hold more than the tensor asked for: safetensors files are memory-mapped after
their header has been checked against the file size, and ``.bin``/``.pth`` files are opened
only through ``torch.load(weights_only=True, mmap=True)`` so a pickle cannot run code.

Writers stream: ``StreamingSafetensorsWriter`` lays out a file from known shapes, writes the
header first and each tensor as it arrives, hashing as it goes. ``staging_dir`` builds a
directory beside its destination and moves it into place only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
import uuid
from concurrent.futures import Executor
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from shared.config import ModelConfig
from shared.checkpoint.index import BadIndex, read_index
from shared.paths import UnsafePath, contained
from shared.files import MappedFile, copy_range, sha256_file, start_writeback  # noqa: F401 - re-exported
from shared.checkpoint import layout as L


class CheckpointError(ValueError):
    """A checkpoint or source file that cannot be used as is; the message says why and what to do."""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_WRITEBACK_BYTES = 8 << 20
_DURABLE_BYTES = 64 << 20


def _datasync(fd: int) -> None:
    with contextlib.suppress(OSError):  # a real failure shows at the final fsync
        os.fdatasync(fd)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(name, name)
    if key not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPES[key]


# ---- safetensors reading --------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file's real size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated?)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path}: header claims {n} bytes but the file has {size - 8} after the length field; "
                "the file is truncated or not a safetensors file - re-download or re-export it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from e
    header.pop("__metadata__", None)
    data = size - 8 - n
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        try:
            start, stop = info["data_offsets"]
            dt = _ST_DTYPES[info["dtype"]]
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for {name!r}: {info}") from e
        want = numel * torch.empty((), dtype=dt).element_size()
        if stop - start != want or start != end:
            raise CheckpointError(
                f"{path}: header entry {name!r} (shape {info['shape']}, {info['dtype']}) spans bytes "
                f"{start}..{stop} but needs {want} bytes at offset {end}; the header is corrupt")
        end = stop
    if end != data:
        raise CheckpointError(
            f"{path}: the header describes {end} bytes of tensor data but the file holds {data}; "
            + ("the file is truncated - re-download or re-export it" if end > data else "the file is corrupt"))
    return header


class TensorSource:
    """Named tensors read one at a time. Subclasses fill ``_where`` (name -> handle)."""

    def __init__(self) -> None:
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of ``name`` (a reader that assembles tensors builds only these)."""
        return self.get(name)[lo:hi]

    def files(self) -> list[Path]:
        return []

    def release(self) -> None:
        """Let go of whatever was mapped for earlier reads (a reader that streams calls this as it goes)."""

    def prefetch(self, names: Sequence[str]) -> None:
        """Have the OS start reading these tensors now (a reader that streams asks one step ahead)."""

    def close(self) -> None:
        pass


class SafetensorsSource(TensorSource):
    """One or more safetensors files, each tensor read when asked for.

    By default ``get`` returns a tensor of its own (read with ``pread``), free to be changed.
    With ``zero_copy`` it returns a view of a private memory map of the file instead - nothing
    is copied, and the map goes with the last reference to the tensor - and writers copy such
    views file-to-file in the kernel (``MappedFile.locate``), so the caller must treat them as
    read-only: the converter does; a model that trains on its weights must not.
    """

    def __init__(self, paths: Sequence[Path], index: Mapping[str, str] | None = None,
                 zero_copy: bool = False) -> None:
        super().__init__()
        self._paths = list(paths)
        self._zero_copy = zero_copy
        self._files: dict[Path, MappedFile] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}
        for p in self._paths:
            header = read_safetensors_header(p)
            with open(p, "rb") as f:
                base = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, info in header.items():
                start, stop = info["data_offsets"]
                self._where[name] = (p, base + start, stop - start)
                self._shapes[name] = tuple(int(s) for s in info["shape"])
                self._dtypes[name] = _ST_DTYPES[info["dtype"]]
        if index is not None:
            for name, fname in index.items():
                if name not in self._where:
                    raise CheckpointError(f"the index names tensor {name!r} in {fname} but that file does not hold it")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        path, offset, n = self._where[name]
        shape, dtype = self._shapes[name], self._dtypes[name]
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        if path not in self._files:
            self._files[path] = MappedFile(path)
        if self._files[path].size() < offset + n:
            raise CheckpointError(f"{path}: ended early while reading {name}; the file was truncated")
        if self._zero_copy:
            return torch.frombuffer(self._files[path].map(offset, n), dtype=dtype).reshape(shape)
        buf = bytearray(n)
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(self._files[path].fd, [view[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"{path}: ended early while reading {name}; the file was truncated")
            done += got
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def prefetch(self, names: Sequence[str]) -> None:
        for name in names:
            path, offset, n = self._where[name]
            if path not in self._files:
                self._files[path] = MappedFile(path)
            os.posix_fadvise(self._files[path].fd, offset, n, os.POSIX_FADV_WILLNEED)

    def files(self) -> list[Path]:
        return list(self._paths)

    def close(self) -> None:
        self._files.clear()  # each file closes once no tensor read from it is left


def safe_torch_load(path: Path) -> object:
    """``torch.load`` that refuses to run code; mmap so tensors are paged in on use."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors ({str(e).splitlines()[0]}). "
            "Loading it could run arbitrary code; convert it to safetensors with a trusted tool first") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({e}); the file is corrupt or truncated") from e


class TorchFilesSource(TensorSource):
    """``pytorch_model*.bin`` files (state dicts), loaded safely and memory-mapped."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._paths = list(paths)
        self._tensors: dict[str, torch.Tensor] = {}
        for p in self._paths:
            sd = safe_torch_load(p)
            if not isinstance(sd, dict):
                raise CheckpointError(f"{p}: expected a state dict, found {type(sd).__name__}")
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    self._tensors[name] = t  # mmap-backed: no copy until read
                    self._shapes[name] = tuple(t.shape)
                    self._dtypes[name] = t.dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        return self._tensors[name]

    def files(self) -> list[Path]:
        return list(self._paths)


def _load_index(path: Path) -> dict[str, Path]:
    try:
        return read_index(path)
    except BadIndex as e:
        raise CheckpointError(str(e)) from None


def _weight_files(d: Path, pattern: str) -> list[Path]:
    """The files matching ``pattern`` directly in ``d``, each contained in it (no links out)."""
    try:
        return [contained(d, p.name, "weight file") for p in sorted(d.glob(pattern))]
    except UnsafePath as e:
        raise CheckpointError(str(e)) from None


def open_hf_weights(directory: Path, zero_copy: bool = False) -> TensorSource:
    """The weights of an HF checkpoint directory (safetensors preferred, sharded or not).

    Shard names from an index are resolved inside ``directory`` (``shared.paths.contained``).
    ``zero_copy``: safetensors tensors are read-only views of the files (see ``SafetensorsSource``)."""
    d = Path(directory)
    if (d / "model.safetensors.index.json").exists():
        where = _load_index(d / "model.safetensors.index.json")
        index = {n: p.name for n, p in where.items()}
        return SafetensorsSource(sorted(set(where.values())), index, zero_copy)
    singles = _weight_files(d, "model.safetensors") or _weight_files(d, "*.safetensors")
    if singles:
        return SafetensorsSource(singles, zero_copy=zero_copy)
    if (d / "pytorch_model.bin.index.json").exists():
        where = _load_index(d / "pytorch_model.bin.index.json")
        return TorchFilesSource(sorted(set(where.values())))
    bins = _weight_files(d, "pytorch_model*.bin")
    if bins:
        return TorchFilesSource(bins)
    raise CheckpointError(
        "no weights found in the checkpoint (expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model*.bin)")


def check_hf_shapes(source: TensorSource, cfg: ModelConfig) -> None:
    """Every tensor ``cfg`` needs is present with the shape the config implies."""
    problems = []
    for name in L.hf_names(cfg):
        if name not in source:
            problems.append(f"{name} is missing")
            continue
        want, got = L.hf_shape(cfg, name), source.shape(name)
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            if got[1:] != want[1:] or got[0] < want[0]:
                problems.append(f"{name} has shape {list(got)}, config implies {list(want)}")
        elif got != want:
            problems.append(f"{name} has shape {list(got)}, config implies {list(want)}")
    known = set(L.hf_names(cfg)) | {"lm_head.weight"}  # a tied model may still store its lm_head copy
    extra = [n for n in source.names() if n not in known and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        problems.append(f"the weights hold tensors this architecture does not have ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}); converting would silently drop them")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"config and weights disagree: {shown}. Check that config.json belongs to these weights")


# ---- streaming safetensors writing ----------------------------------------------------------

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
            header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
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


def disk_error(e: OSError, path) -> Exception:
    """A full disk as a clear ``CheckpointError``; other errors unchanged."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(
            f"the disk holding {path} is full ({e.strerror}); free space "
            "or choose a --save-dir on a larger disk. Nothing was left behind")
    return e


# ---- output directories ---------------------------------------------------------------------

def check_save_dir(save_dir: Path, overwrite: bool) -> None:
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise CheckpointError(f"--save-dir {save_dir} exists and is not a directory")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"--save-dir {save_dir} is not empty; choose another directory or pass --overwrite "
            "(the old contents are replaced only once the new checkpoint is complete)")


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def staging_dir(save_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling directory; on success it replaces ``save_dir``, on error it is removed.

    An existing checkpoint is swapped out atomically where the OS allows, so readers see the
    old or the new checkpoint, never a mix.
    """
    save_dir = Path(save_dir).absolute()
    check_save_dir(save_dir, overwrite)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.with_name(f".{save_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        check_save_dir(save_dir, overwrite)  # something may have appeared meanwhile
        if save_dir.exists() and any(save_dir.iterdir()):
            if _rename_exchange(tmp, save_dir):
                shutil.rmtree(tmp)
                return
            old = save_dir.with_name(f".{save_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(save_dir, old)
            os.rename(tmp, save_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if save_dir.exists():
                save_dir.rmdir()
            os.rename(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
