"""The run directory a finetuning run writes with ``--save OUT`` (and the tracker Megatron-LM shares).

    <save>/latest_checkpointed_iteration.txt  the newest complete iteration ("8"; Megatron-LM may say "release")
    <save>/iter_0000008/                      a training checkpoint: a native checkpoint + training/state.json
    <save>/release/                           the finished model, native format
    <save>/hf/, <save>/lora/                  exports (see shared/training/checkpoint.py)

The tracker is read only through ``read_tracker``: it must hold an iteration number (at most
``MAX_ITERATION``) or ``release``, so it can never name a directory outside the run.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.checkpoint.errors import CheckpointError

LATEST = "latest_checkpointed_iteration.txt"
STATE = "training/state.json"
RELEASE = "release"
MAX_ITERATION = 10**9 - 1


def iteration_dir(save: str | Path, iteration: int | str) -> Path:
    """``<save>/iter_NNNNNNN`` (or ``<save>/release``)."""
    if iteration == RELEASE:
        return Path(save) / RELEASE
    return Path(save) / f"iter_{check_iteration(iteration):07d}"


def check_iteration(iteration: object, where: str = "iteration") -> int | str:
    """An iteration number in 0..MAX_ITERATION, or ``release``; anything else is refused."""
    if iteration == RELEASE:
        return RELEASE
    if isinstance(iteration, bool) or not isinstance(iteration, (int, str)):
        raise CheckpointError(f"{where} must be an iteration number or 'release', not {type(iteration).__name__}")
    text = str(iteration).strip()
    if not text.isdigit() or not text.isascii():
        raise CheckpointError(f"{where} is {text[:40]!r}, not an iteration number or 'release'; "
                              "pass the number of a saved iteration (the iter_NNNNNNN directories) or 'release'")
    if len(text) > len(str(MAX_ITERATION)) or int(text) > MAX_ITERATION:
        raise CheckpointError(f"{where} {text[:40]}{'...' if len(text) > 40 else ''} is beyond any saved "
                              f"iteration (at most {MAX_ITERATION}); the tracker file is corrupt - rewrite it with "
                              "the number of a saved iteration")
    return int(text)


def read_tracker(directory: str | Path) -> int | str:
    """The iteration ``latest_checkpointed_iteration.txt`` names (an int or ``release``)."""
    path = Path(directory) / LATEST
    try:
        raw = path.read_bytes()[:64]
    except OSError as e:
        raise CheckpointError(f"cannot read {LATEST} ({e.strerror})") from None
    text = raw.decode("ascii", errors="replace").strip()
    return check_iteration(text, f"{LATEST}: the iteration it names")


def write_latest(save: str | Path, iteration: int) -> None:
    """Name ``iteration`` the newest complete one (replaced atomically)."""
    path = Path(save) / LATEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{iteration}\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def saved_iterations(save: str | Path) -> list[int | str]:
    """The iterations present in a run directory (numbers ascending, then ``release``)."""
    d = Path(save)
    out: list[int | str] = sorted(int(p.name[5:]) for p in d.glob("iter_*")
                                  if p.is_dir() and p.name[5:].isdigit())
    return out + ([RELEASE] if (d / RELEASE).is_dir() else [])
