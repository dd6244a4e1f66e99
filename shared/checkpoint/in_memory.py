"""State dicts and stages made in memory, without a checkpoint directory.

``random_state``: random weights of one rank's shapes (benchmarks); ``load_hf_single``: an HF
state dict as a single-process (TP1/PP1) model (references and tests). Both follow the
name/layout table of ``shared.checkpoint.layout``, which the model itself never reads.
"""

from __future__ import annotations

from typing import Mapping

import torch

from shared.checkpoint.layout import hf_to_shards, param_specs
from shared.checkpoint.native import shard_shape
from shared.config import ModelConfig
from shared.model import LlamaStage, load_stage
from shared.parallel.layout import Layout
from shared.parallel.state import ParallelContext


def random_state(cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of rank (tp_rank, pp_rank)'s shapes (benchmarks), made on ``device``."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed * 1000 + tp_rank * 10 + pp_rank)
    out = {}
    for spec in param_specs(cfg, layout):
        if spec.pp_rank(cfg, layout) != pp_rank:
            continue
        shape = shard_shape(spec, cfg, layout)
        if "layernorm" in spec.name:
            t = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)
        out[spec.local_name(cfg, layout)] = t
    return out


def load_hf_single(cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                   vocab_divisible_by: int = 128) -> LlamaStage:
    """A single-process (TP1/PP1) model from an HF state dict."""
    shards = hf_to_shards(hf_state, cfg, Layout(1, 1, vocab_divisible_by))[(0, 0)]
    return load_stage(cfg, ParallelContext.single(), shards, dtype, vocab_divisible_by)
