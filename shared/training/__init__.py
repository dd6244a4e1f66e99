"""Finetuning over TP x PP x DP: ``train(TrainConfig(...), progress, should_cancel) -> summary``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from shared.training.config import ConfigError, TrainConfig
from shared.training.data import DataError
from shared.training.loop import Cancelled, TrainingError, train

__all__ = ["Cancelled", "ConfigError", "DataError", "TrainConfig", "TrainingError", "run_finetune", "train"]

SERVICE_KEYS = ("source", "output")  # job fields the queue uses, not training options


def run_finetune(params: dict[str, Any], source_dir: str | Path, save_dir: str | Path,
                 progress: Callable[[dict], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """A finetune job: ``params`` are TrainConfig fields (``load``/``save`` come from the job);
    ``params["data"]`` may carry the records inline instead of ``data_path``.

    The finished native checkpoint ends up in ``save_dir`` (what the job commits); the run
    directory (training checkpoints, ``hf/``, ``lora/``) is ``<save_dir>-run`` beside it.
    """
    save_dir = Path(save_dir)
    run_dir = save_dir.with_name(save_dir.name + "-run")
    run_dir.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in params.items() if k not in SERVICE_KEYS and k != "data"}
    if "data" in params:
        path = run_dir / "data.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for rec in params["data"]:
                f.write(json.dumps(rec) + "\n")
        options["data_path"] = [str(path)]
    config = TrainConfig.from_dict({**options, "load": str(source_dir), "save": str(run_dir)})
    result = train(config, progress, should_cancel)
    if result.get("status") == "completed":
        if save_dir.exists():
            shutil.rmtree(save_dir)
        os.replace(result["checkpoint"], save_dir)
        result["checkpoint"] = str(save_dir)
    return result
