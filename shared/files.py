"""Small file helpers shared by the storage layer and the checkpoint formats (no torch here)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def keep_freed_memory(limit: int = 512 << 20) -> None:
    """Let glibc reuse freed buffers below ``limit`` instead of returning them to the kernel.

    Streaming conversion allocates and frees a tensor-sized buffer per parameter; with glibc's
    defaults each one is a fresh mmap whose pages fault in again (about a third of the
    conversion's time here). No effect off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, limit)
    mallopt(m_trim_threshold, 2 * limit)
