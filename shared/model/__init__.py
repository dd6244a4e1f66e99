"""The Llama-family decoder: config-driven, TP-sharded, one module per pipeline stage."""

from __future__ import annotations

from typing import Mapping

import torch

from shared.config import ModelConfig
from shared.model.kv_cache import CacheRows, KVCache
from shared.model.rope import inv_frequencies
from shared.model.transformer import LlamaStage
from shared.parallel.state import ParallelContext

__all__ = ["CacheRows", "KVCache", "LlamaStage", "load_hf_single", "load_stage", "random_state"]


def load_stage(cfg: ModelConfig, ctx: ParallelContext, state: Mapping[str, torch.Tensor],
               dtype: torch.dtype | None = None, vocab_divisible_by: int = 128, **kw) -> LlamaStage:
    """Build this rank's stage and load its local state dict (keys matched strictly)."""
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):
        stage = LlamaStage(cfg, ctx, dtype=dtype, vocab_divisible_by=vocab_divisible_by, device="meta", **kw)
    stage.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    stage.inv_freq = inv_frequencies(cfg).to(ctx.device)  # the meta buffer holds no data
    return stage.to(ctx.device).eval()


def load_hf_single(cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                   vocab_divisible_by: int = 128) -> LlamaStage:
    """A single-process (TP1/PP1) model from an HF state dict."""
    from shared.checkpoint.layout import Layout, hf_to_shards

    layout = Layout(1, 1, vocab_divisible_by)
    shards = hf_to_shards(hf_state, cfg, layout)[(0, 0)]
    return load_stage(cfg, ParallelContext.single(), shards, dtype, vocab_divisible_by)


def random_state(cfg: ModelConfig, layout, tp_rank: int, pp_rank: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of rank (tp_rank, pp_rank)'s shapes (benchmarks), made on ``device``."""
    from shared.checkpoint.layout import param_specs
    from shared.checkpoint.native import shard_shape

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
