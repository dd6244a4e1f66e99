"""How a model is split over ranks: tensor- and pipeline-parallel degrees and the vocab padding.

A ``Layout`` is the parallelism of a checkpoint or of a run; the tensors each (tp, pp) rank
holds in a layout are described by ``shared.checkpoint.layout``.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import ModelConfig
from shared.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Layout:
    """How a checkpoint is split: TP, PP and the vocab padding multiple."""

    tp: int = 1
    pp: int = 1
    divisible_by: int = 128

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(tp=self.tp, pp=self.pp)

    def check(self, cfg: ModelConfig) -> None:
        self.dims.check_model(cfg)

    def stage_layers(self, cfg: ModelConfig, pp_rank: int) -> range:
        return self.dims.stage_layers(cfg.num_layers, pp_rank)

    def padded_vocab(self, cfg: ModelConfig) -> int:
        return cfg.padded_vocab_size(self.tp, self.divisible_by)

    def ranks(self) -> list[tuple[int, int]]:
        """All (tp_rank, pp_rank) pairs, pp-major."""
        return [(t, p) for p in range(self.pp) for t in range(self.tp)]
