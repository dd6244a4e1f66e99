"""Small file helpers shared by the storage layer and the checkpoint formats (no torch here)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import threading
from pathlib import Path


class Stopped(Exception):
    """``sha256_file`` was told to stop."""


def sha256_file(path: str | Path, chunk: int = 8 << 20, should_stop=None) -> str:
    """sha256 of a file, hashed straight from the page cache (mapped a chunk at a time).

    ``should_stop``: checked between chunks; when it returns true, raises ``Stopped``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not os.path.isfile(path) or size == 0:
            while block := f.read(chunk):
                h.update(block)
            return h.hexdigest()
        for offset in range(0, size, chunk):
            if should_stop is not None and should_stop():
                raise Stopped(str(path))
            h.update(map_range(f.fileno(), offset, min(chunk, size - offset)))
    return h.hexdigest()


def keep_freed_memory(limit: int = 512 << 20) -> None:
    """Let glibc reuse freed buffers below ``limit`` instead of returning them to the kernel.

    Streaming conversion allocates and frees a tensor-sized buffer per parameter; with glibc's
    defaults each one is a fresh mmap whose pages fault in again (about a third of the
    conversion's time here). No effect off glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, limit)
    mallopt(m_trim_threshold, 2 * limit)


def release_freed_memory() -> None:
    """Hand the pages of freed heap memory back to the kernel now (glibc's ``malloc_trim``, every
    arena), after a phase whose buffers are gone. No effect off glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def map_range(fd: int, offset: int, length: int, on_unmap=None):
    """A private, read-only-in-practice memory map of ``length`` bytes of ``fd`` from ``offset``.

    Returns a ctypes byte array (buffer protocol) whose map is released when the last
    reference to it goes - no file descriptor is held, unlike ``mmap.mmap``. Pages are shared
    with the page cache, so mapping copies nothing.
    """
    import mmap
    import weakref

    libc = _libc()
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = offset + length - start
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    whole = (ctypes.c_ubyte * size).from_address(addr)
    weakref.finalize(whole, _unmap, addr, size, on_unmap)
    view = (ctypes.c_ubyte * length).from_buffer(whole, offset - start)  # keeps ``whole`` alive
    return view


def _unmap(addr: int, size: int, on_unmap) -> None:
    if on_unmap is not None:
        on_unmap()  # first: once unmapped, the addresses can be handed to a new map at once
    _libc().munmap(addr, size)


class MappedFile:
    """A file opened once and read through private memory maps.

    ``map`` returns page-cache-backed buffers (see ``map_range``); ``locate`` turns the address
    of bytes inside a live map back into (file descriptor, offset), so a writer can have the
    kernel copy them (``copy_file_range``) instead of copying through user space. The file
    stays open while any of its maps is alive.
    """

    _live: dict[int, tuple[int, int, "MappedFile"]] = {}  # map address -> (length, file offset, owner)
    _lock = threading.Lock()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def map(self, offset: int, length: int):
        key: list[int] = []
        view = map_range(self.fd, offset, length, on_unmap=lambda: self._forget(key[0]))
        address = ctypes.addressof(view)
        key.append(address)
        with self._lock:
            self._live[address] = (length, offset, self)  # the entry keeps this file open
        return view

    @classmethod
    def _forget(cls, address: int) -> None:
        with cls._lock:
            cls._live.pop(address, None)

    @classmethod
    def locate(cls, address: int, nbytes: int) -> tuple[int, int] | None:
        """(fd, file offset) of ``nbytes`` at ``address`` if they lie in one live map, else None."""
        with cls._lock:
            for base, (length, offset, owner) in cls._live.items():
                if base <= address and address + nbytes <= base + length:
                    return owner.fd, offset + (address - base)
        return None

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> bool:
    """Copy bytes between files inside the kernel; False where the files or OS do not allow it
    (then nothing was copied and the caller writes the bytes itself)."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as e:
            if done == 0 and e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                return False
            raise
        except AttributeError:
            return False
        if n == 0:
            raise OSError(errno.EIO, f"copy_file_range stopped after {done} of {nbytes} bytes")
        done += n
    return True


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        if hasattr(libc, "sync_file_range"):
            libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _LIBC = libc
    return _LIBC


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it.

    Written pages otherwise sit in the page cache until a threshold or ``fsync``, so a writer
    that fsyncs at the end would do its CPU work and the disk's work one after the other.
    Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere.
    """
    fn = getattr(_libc(), "sync_file_range", None)
    if fn is not None:
        fn(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def lower_thread_priority(niceness: int) -> None:
    """Make the calling thread yield the CPU to the process's other threads (Linux: per-thread nice)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (OSError, AttributeError):
        pass
