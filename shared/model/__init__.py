"""The Llama-family decoder: config-driven, TP-sharded, one module per pipeline stage.

The model builds plain torch layers and reads no checkpoint format: state dicts come from
``shared.checkpoint``, and other implementations (packed CPU kernels, CUDA graphs) are applied
to a built stage by the inference engine (``shared.inference.impls``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from shared.config import ModelConfig
from shared.model.kv_cache import CacheRows, KVCache
from shared.model.rope import inv_frequencies
from shared.model.transformer import LlamaStage
from shared.parallel.state import ParallelContext

__all__ = ["CacheRows", "KVCache", "LlamaStage", "load_stage"]


def load_stage(cfg: ModelConfig, ctx: ParallelContext, state: Mapping[str, torch.Tensor],
               dtype: torch.dtype | None = None, vocab_divisible_by: int = 128, **kw) -> LlamaStage:
    """Build this rank's stage and load its local state dict (keys matched strictly)."""
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):
        stage = LlamaStage(cfg, ctx, dtype=dtype, vocab_divisible_by=vocab_divisible_by, device="meta", **kw)
    stage.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    stage.inv_freq = inv_frequencies(cfg).to(ctx.device)  # the meta buffer holds no data
    return stage.to(ctx.device).eval()
