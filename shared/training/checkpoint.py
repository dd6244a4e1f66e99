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

from pathlib import Path

from shared.checkpoint.opener import Checkpoint, open_checkpoint
from shared.checkpoint.run import LATEST, STATE, iteration_dir, write_latest

__all__ = ["LATEST", "STATE", "Checkpoint", "iteration_dir", "resolve_load", "write_latest"]


def resolve_load(path: str | Path, iteration: int | str | None = None) -> Checkpoint:
    """What ``--load`` names, through ``open_checkpoint``: a checkpoint of any format, or a run
    directory (its latest complete iteration, or ``iteration``). ``state`` is set for a training
    checkpoint; a LoRA run's iteration opens with its base weights (the adapters are resumed apart)."""
    return open_checkpoint(path, iteration=iteration, allow_lora_base=True)
