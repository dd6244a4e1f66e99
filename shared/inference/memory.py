"""How many KV-cache rows fit on a rank's GPU, decided after the weights load and before the cache is allocated.

A row holds ``max_seq`` slots of keys and values for this rank's layers and kv heads:
2 x layers/PP x kv_heads/TP x max_seq x head_dim x dtype bytes (Llama-3-8B at 131072 tokens,
bf16: 16 GiB a row). What is free on the device after the weights, less a working reserve
(the largest prefill chunk's activations and logits, the decode graphs' outputs, and a
margin for the CUDA context, cuBLAS and allocator slack), decides the rows: fewer than asked
gives a smaller max batch (logged by the engine); none at all is an error naming the length
that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.config import ModelConfig
from shared.parallel.dims import ParallelDims

GiB = 1 << 30
MARGIN = 1 * GiB


class MemoryPlanError(RuntimeError):
    """Not even one sequence of the requested length fits; the message says what would."""


@dataclass(frozen=True)
class CachePlan:
    rows: int
    per_row: int
    reserve: int
    free: int


def kv_bytes_per_row(cfg: ModelConfig, dims: ParallelDims, max_seq: int, dtype: torch.dtype) -> int:
    layers = cfg.num_layers // dims.pp
    return 2 * layers * (cfg.num_kv_heads // dims.tp) * max_seq * cfg.head_dim * dtype.itemsize


def working_reserve(cfg: ModelConfig, dims: ParallelDims, prefill_tokens: int, max_batch: int,
                    dtype: torch.dtype, total: int) -> int:
    """Memory a rank needs beside weights and cache: the biggest forward's live tensors and a margin."""
    b = dtype.itemsize
    vocab = cfg.padded_vocab_size(dims.tp) // dims.tp
    per_token = 4 * cfg.hidden_size + cfg.qkv_rows // dims.tp + 3 * cfg.intermediate_size // dims.tp
    acts = prefill_tokens * per_token * b
    logits = prefill_tokens * vocab * (b + 8)  # logits, and their fp32 log-softmax for prompt log-probs
    graphs = 2 * max_batch * vocab * b * 16  # decode outputs of the captured buckets
    return acts + logits + graphs + max(MARGIN, total // 32)


def plan_cache(cfg: ModelConfig, dims: ParallelDims, max_batch: int, max_seq: int, prefill_tokens: int,
               dtype: torch.dtype, free: int, total: int) -> CachePlan:
    """The rows that fit ``free`` bytes (0 if none do: the caller raises with ``explain``)."""
    per_row = kv_bytes_per_row(cfg, dims, max_seq, dtype)
    reserve = working_reserve(cfg, dims, prefill_tokens, max_batch, dtype, total)
    rows = max(0, min(max_batch, (free - reserve) // per_row))
    return CachePlan(int(rows), per_row, reserve, free)


def explain(plan: CachePlan, cfg: ModelConfig, dims: ParallelDims, max_seq: int, device: str) -> str:
    usable = max(0, plan.free - plan.reserve)
    fits = usable * max_seq // plan.per_row
    return (f"the KV cache of one {max_seq}-token sequence needs {plan.per_row / GiB:.2f} GiB on {device} "
            f"({cfg.num_layers // dims.pp} layers x {cfg.num_kv_heads // dims.tp} kv heads per rank), but only "
            f"{plan.free / GiB:.1f} GiB are free after the weights, {plan.reserve / GiB:.1f} GiB of it kept for "
            f"working memory; lower --max-seq-len (about {fits} tokens fit one sequence) or add tensor/pipeline-"
            "parallel ranks")
