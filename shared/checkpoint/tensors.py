"""Reading source tensors one at a time, safely.

Readers never hold more than the tensor asked for: safetensors files are memory-mapped after
their header has been checked against the file size, and ``.bin``/``.pth`` files are opened
only through ``torch.load(weights_only=True, mmap=True)`` so a pickle cannot run code.
``open_hf_weights`` finds an HF directory's weights (sharded or not, through its index).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Mapping, Sequence

import torch

from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.index import BadIndex, read_index
from shared.files import MappedFile
from shared.paths import UnsafePath, contained

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


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
            dt = ST_DTYPES[info["dtype"]]
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
                self._dtypes[name] = ST_DTYPES[info["dtype"]]
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

