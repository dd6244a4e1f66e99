"""Parallel degrees (tensor, pipeline, data) and their validation against a model."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import ModelConfig


class LayoutError(ValueError):
    """A parallel layout that cannot hold the model; the message says what to change."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """TP x PP x DP. Rank order is Megatron's: tp fastest, then dp, then pp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} size must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise LayoutError(
                f"world size {world_size} != TP({self.tp}) x PP({self.pp}) x DP({self.dp}) = "
                f"{self.world_size}; start {self.world_size} processes or change the degrees"
            )

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise LayoutError naming every degree that does not divide the model."""
        problems = []
        ok_tp = [d for d in _divisors(cfg.num_kv_heads)
                 if cfg.num_heads % d == 0 and cfg.intermediate_size % d == 0]
        if cfg.num_kv_heads % self.tp:
            problems.append(
                f"tensor-parallel size {self.tp} does not divide the {cfg.num_kv_heads} kv heads "
                "(each TP rank must hold whole kv groups)")
        if cfg.num_heads % self.tp:
            problems.append(f"tensor-parallel size {self.tp} does not divide the {cfg.num_heads} attention heads")
        if cfg.intermediate_size % self.tp:
            problems.append(
                f"tensor-parallel size {self.tp} does not divide the FFN size {cfg.intermediate_size}")
        if problems:
            problems[-1] += f"; valid TP sizes for this model: {ok_tp}"
        if cfg.num_layers % self.pp:
            problems.append(
                f"pipeline-parallel size {self.pp} does not divide the {cfg.num_layers} layers; "
                f"valid PP sizes: {_divisors(cfg.num_layers)}")
        if problems:
            raise LayoutError("; ".join(problems))

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (tp_rank, pp_rank, dp_rank)."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return tp_rank, pp_rank, dp_rank

    def rank(self, tp_rank: int, pp_rank: int, dp_rank: int = 0) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def stage_layers(self, num_layers: int, pp_rank: int) -> range:
        per = num_layers // self.pp
        return range(pp_rank * per, (pp_rank + 1) * per)
