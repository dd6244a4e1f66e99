"""Per-process parallel state: this rank's coordinates and its process groups, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from shared.parallel.dims import ParallelDims


@dataclass
class ParallelContext:
    """What one rank needs to know about the layout. Groups are None in a single process."""

    dims: ParallelDims
    rank: int = 0
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    # the first and last stage of this rank's pipeline (PP > 1, those two stages only): the
    # tied embedding's gradient is all-reduced over it, as Megatron's embedding group
    embedding_group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # global ranks of this rank's pipeline peers, indexed by pp_rank
    pp_ranks: tuple[int, ...] = (0,)

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelContext":
        return cls(dims=ParallelDims(), device=torch.device(device))

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first_stage else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last_stage else self.pp_ranks[self.pp_rank + 1]

    @property
    def last_stage_rank(self) -> int:
        return self.pp_ranks[-1]


def build_groups(dims: ParallelDims, rank: int, device: torch.device, ranks: list[int] | None = None) -> ParallelContext:
    """Create the TP, PP and DP groups of ``dims`` over the global ranks ``ranks`` (default 0..world-1).

    Every process of the default group must call this with the same arguments (new_group is
    collective); a process outside ``ranks`` gets ``None``. With PP > 1 there is also one
    embedding group per (tp, dp) of the first and the last stage.
    """
    ranks = list(range(dims.world_size)) if ranks is None else ranks
    dims.check_world(len(ranks))
    mine: dict[str, Any] = {}
    pp_ranks: tuple[int, ...] = ()
    local = ranks.index(rank) if rank in ranks else None

    def make(members: list[int], key: str) -> None:
        nonlocal pp_ranks
        group = dist.new_group([ranks[m] for m in members]) if dims.world_size > 1 else None
        if local in members:
            mine[key] = group
            if key == "pp":
                pp_ranks = tuple(ranks[m] for m in members)

    for p in range(dims.pp):
        for d in range(dims.dp):
            make([dims.rank(t, p, d) for t in range(dims.tp)], "tp")
    for t in range(dims.tp):
        for d in range(dims.dp):
            make([dims.rank(t, p, d) for p in range(dims.pp)], "pp")
    for p in range(dims.pp):
        for t in range(dims.tp):
            make([dims.rank(t, p, d) for d in range(dims.dp)], "dp")
    if dims.pp > 1:
        for t in range(dims.tp):
            for d in range(dims.dp):
                make([dims.rank(t, 0, d), dims.rank(t, dims.pp - 1, d)], "embedding")
    if local is None:
        return None  # type: ignore[return-value]
    return ParallelContext(dims=dims, rank=local, tp_group=mine["tp"], pp_group=mine["pp"],
                           dp_group=mine["dp"], embedding_group=mine.get("embedding"), device=device,
                           pp_ranks=pp_ranks)
