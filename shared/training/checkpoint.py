"""A run directory and what ``--load`` may point at.

    <save>/iter_0000100/                    a training checkpoint: a native checkpoint (manifest,
        model_tp{t}_pp{p}.safetensors,      rank files, tokenizer/) whose model files hold the
        tokenizer/, manifest.json           trained weights (LoRA: the frozen base weights), plus
        training/state.json                 iteration, data fingerprints, the run's options,
        training/optim_tp{t}_pp{p}.*        fp32 masters and Adam moments per (tp, pp),
        training/adapter_tp{t}_pp{p}.*      LoRA factors, and
        training/rng_tp{t}_pp{p}_dp{d}.pt   every rank's RNG state
    <save>/latest_checkpointed_iteration.txt  the newest complete one (replaced atomically)
    <save>/release/                         the finished model, native format (LoRA: merged)
    <save>/hf/                              the same as an HF checkpoint
    <save>/lora/                            LoRA runs: the adapters alone (per-rank, local names)

Every directory is written beside its final name and renamed into place when complete (the
manifest last), so a crash mid-save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.checkpoint.safe_io import CheckpointError

LATEST = "latest_checkpointed_iteration.txt"
STATE = "training/state.json"


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def write_latest(save: str | Path, iteration: int) -> None:
    path = Path(save) / LATEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{iteration}\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Source:
    """What ``--load`` names: ``kind`` is native or hf; ``state`` is set for a training checkpoint."""

    kind: str
    directory: Path
    state: dict[str, Any] | None = None


def resolve_load(path: str | Path) -> Source:
    from shared.checkpoint.native import declared_format

    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"--load {d} does not exist or is not a directory")
    if declared_format(d) == "hf":  # an HF checkpoint as the object store fetched it
        return Source("hf", d)
    if (d / LATEST).exists():
        text = (d / LATEST).read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{d / LATEST} holds {text!r}, not an iteration number")
        d = iteration_dir(d, int(text))
        if not (d / STATE).exists():
            raise CheckpointError(f"{d} (named by {LATEST}) is missing or incomplete")
    if (d / STATE).exists():
        return Source("native", d, json.loads((d / STATE).read_text()))
    if (d / "manifest.json").exists():
        return Source("native", d)
    if (d / "config.json").exists():
        return Source("hf", d)
    if (d / "release" / "manifest.json").exists():
        return Source("native", d / "release")
    raise CheckpointError(
        f"--load {d} is neither a checkpoint (manifest.json), an HF model (config.json) nor a training run "
        f"({LATEST}); a conversion or save that did not finish leaves no manifest")
