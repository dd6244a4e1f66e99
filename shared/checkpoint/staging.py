"""Output directories: refuse to clobber, build beside the destination, swap in when complete."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from shared.checkpoint.errors import CheckpointError


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
