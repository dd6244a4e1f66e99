"""Where the engine's weights come from: the engine's view of a ``Checkpoint`` handle.

Any checkpoint ``shared.checkpoint.opener.open_checkpoint`` opens can be served (native, HF,
Meta, Megatron-LM, a training run directory), or random weights for benchmarks. The source is
small and picklable: the controller opens the checkpoint once and every rank reads only its own
(tp, pp) shard, resharded on load when the requested layout differs from the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.layout import Layout
from shared.checkpoint.opener import Checkpoint, open_checkpoint
from shared.config import ModelConfig

SourceError = CheckpointError  # the checkpoint cannot be served; the message says what to pass instead


@dataclass(frozen=True)
class ModelSource:
    checkpoint: Checkpoint

    @classmethod
    def open(cls, path: str | Path, iteration: int | str | None = None) -> "ModelSource":
        return cls(open_checkpoint(path, iteration=iteration))

    @classmethod
    def random(cls, config_path: str | Path, seed: int = 0) -> "ModelSource":
        """Random weights of an HF config.json's shapes (benchmarks)."""
        return cls(Checkpoint.random(config_path, seed))

    @property
    def kind(self) -> str:
        return self.checkpoint.format

    # ---- facts the controller needs ---------------------------------------------------------
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    def stored_layout(self) -> Layout:
        return self.checkpoint.layout

    def stored_dtype(self) -> torch.dtype:
        return self.checkpoint.dtype

    def generation_config(self) -> dict[str, Any]:
        return self.checkpoint.generation_config()

    def eos_ids(self, tokenizer=None) -> tuple[int, ...]:
        return self.checkpoint.eos_ids(tokenizer)

    def tokenizer(self):
        return self.checkpoint.tokenizer()

    def name(self) -> str:
        c = self.checkpoint
        return Path(c.run or c.directory).resolve().name

    # ---- what one rank loads ----------------------------------------------------------------
    def local_state(self, layout: Layout, tp_rank: int, pp_rank: int,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return self.checkpoint.rank_state(layout, tp_rank, pp_rank, dtype)
