"""Finetuning over TP x PP x DP: ``train(TrainConfig(...), progress, should_cancel) -> summary``.

``config`` and ``records`` import no torch (the gateway validates job configs and datasets
with them); the trainer itself is imported on first use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from shared.specs.train import ConfigError, TrainConfig
from shared.specs.records import DataError

__all__ = ["Cancelled", "ConfigError", "DataError", "TrainConfig", "TrainingError", "run_finetune", "train",
           "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"  # in the run directory, written by every service finetune


def __getattr__(name: str):
    if name in ("Cancelled", "TrainingError", "train"):
        from shared.training import loop

        return getattr(loop, name)
    raise AttributeError(name)


def run_finetune(options: dict[str, Any], source_dir: str | Path, save_dir: str | Path, *,
                 data: Sequence[Path], valid: Sequence[Path] = (),
                 progress: Callable[[dict], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, devices=None) -> dict[str, Any]:
    """A finetune job: ``options`` are TrainConfig fields other than paths (a job names no host
    path); ``data``/``valid`` are the JSONL files the service placed in the job's directory;
    ``devices``: the worker's CUDA ordinals (default: every visible one).

    The finished native checkpoint ends up in ``save_dir`` (what the job commits); the run
    directory (training checkpoints, ``hf/``, ``lora/``, ``metrics.jsonl``) is ``<save_dir>-run``.
    """
    from shared.training.loop import train

    paths = {"load", "save", "data_path", "valid_data_path", "metrics_file"} & set(options)
    if paths:
        raise ConfigError(f"{sorted(paths)} name host paths, which a job cannot set; the service places the "
                          "checkpoint, the data (`data`/`dataset`) and the metrics itself")
    save_dir = Path(save_dir)
    run_dir = save_dir.with_name(save_dir.name + "-run")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig.from_dict({**options, "load": str(source_dir), "save": str(run_dir),
                                    "data_path": [str(p) for p in data], "valid_data_path": [str(p) for p in valid],
                                    "metrics_file": str(run_dir / METRICS_FILE)})
    result = train(config, progress, should_cancel, devices=devices)
    if result.get("status") == "completed":
        if save_dir.exists():
            shutil.rmtree(save_dir)
        os.replace(result["checkpoint"], save_dir)
        result["checkpoint"] = str(save_dir)
    return result
