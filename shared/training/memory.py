"""A training plan's memory per GPU, estimated before anything is loaded; a plan that does not fit is refused.

Per rank: the stage's weights, the fp32 masters of low-precision trainable weights, Adam's two
fp32 moments, the fp32 gradient buffers (``main_grad``), and the activations 1F1B keeps alive
(stage p holds up to ``min(P - p, M)`` micro-batches; each layer saves its norms' inputs and
outputs, q/k/v before and after RoPE, the attention output and the MLP's three
intermediates; with recomputation only each layer's input), plus on the last stage the
logits of one micro-batch with their fp32 copy and softmax (vocab-parallel cross entropy).
A fixed headroom covers the CUDA context, NCCL buffers and allocator slack. The estimate is
deliberately simple and errs high; it is compared with the free memory each rank reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from shared.config import ModelConfig
from shared.specs.train import ConfigError, TrainConfig

GiB = 1 << 30
HEADROOM = 2 * GiB


@dataclass(frozen=True)
class RankMemory:
    pp_rank: int
    weights: int
    master: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.master + self.optimizer + self.gradients + self.activations + HEADROOM

    def describe(self) -> str:
        parts = ("weights", "master", "optimizer", "gradients", "activations")
        return ", ".join(f"{p} {getattr(self, p) / GiB:.1f}" for p in parts) + f", headroom {HEADROOM / GiB:.0f}"


def _layer_parameters(cfg: ModelConfig, tp: int) -> int:
    h, f = cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.qkv_rows // tp * h + (cfg.qkv_rows // tp if cfg.qkv_bias else 0)
    return qkv + cfg.num_heads * cfg.head_dim // tp * h + 3 * f // tp * h + 2 * h


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, divisible_by: int = 128) -> int:
    """Parameters held by one rank of stage ``pp_rank`` (its TP shard)."""
    vocab_rows = cfg.padded_vocab_size(tp, divisible_by) // tp
    n = cfg.num_layers // pp * _layer_parameters(cfg, tp)
    if pp_rank == 0:
        n += vocab_rows * cfg.hidden_size
    if pp_rank == pp - 1:
        n += cfg.hidden_size + (vocab_rows * cfg.hidden_size if not cfg.tie_word_embeddings or pp > 1 else 0)
    return n


def lora_parameters(cfg: ModelConfig, c: TrainConfig, tp: int, pp: int) -> int:
    """Adapter parameters on one rank (A and B of each targeted linear, replicated factors whole)."""
    h, r = cfg.hidden_size, c.lora_rank
    shapes = {"linear_qkv": (h, cfg.qkv_rows // tp), "linear_proj": (cfg.num_heads * cfg.head_dim // tp, h),
              "linear_fc1": (h, 2 * cfg.intermediate_size // tp), "linear_fc2": (cfg.intermediate_size // tp, h)}
    per_layer = sum(r * (i + o) for name, (i, o) in shapes.items() if name in c.lora_targets)
    return cfg.num_layers // pp * per_layer


def _activations(cfg: ModelConfig, c: TrainConfig, tp: int, pp: int, pp_rank: int, dtype_bytes: int) -> int:
    tokens = c.micro_batch_size * c.seq_length
    h, f = cfg.hidden_size, cfg.intermediate_size
    per_token_layer = 4 * h + 2 * cfg.qkv_rows // tp + 2 * cfg.num_heads * cfg.head_dim // tp + 4 * f // tp
    layers = cfg.num_layers // pp
    if c.recompute_activations:  # layer inputs, plus one layer recomputed at a time
        per_micro = tokens * dtype_bytes * (layers * h + per_token_layer)
    else:
        per_micro = tokens * dtype_bytes * layers * per_token_layer
    in_flight = min(pp - pp_rank, max(c.num_microbatches, 1))
    total = in_flight * per_micro
    if pp_rank == pp - 1:
        total += tokens * cfg.padded_vocab_size(tp, c.make_vocab_size_divisible_by) // tp * (dtype_bytes + 8)
    return total


def estimate(cfg: ModelConfig, c: TrainConfig, pp_rank: int) -> RankMemory:
    """The memory one rank of stage ``pp_rank`` needs under plan ``c`` (its TP, PP, dtype, method)."""
    tp, pp = c.tp, c.pp
    b = 2 if c.bf16 else 4
    params = stage_parameters(cfg, tp, pp, pp_rank, c.make_vocab_size_divisible_by)
    if c.lora:
        trainable, master = lora_parameters(cfg, c, tp, pp), 0  # adapters are fp32: their own masters
        params += trainable
        weights = (params - trainable) * b + trainable * 4
    else:
        trainable, weights = params, params * b
        master = params * 4 if c.bf16 else 0
    return RankMemory(pp_rank, weights, master, 8 * trainable, 4 * trainable,
                      _activations(cfg, c, tp, pp, pp_rank, b))


def worst_rank(cfg: ModelConfig, c: TrainConfig) -> RankMemory:
    return max((estimate(cfg, c, p) for p in range(c.pp)), key=lambda m: m.total)


def _alternatives(cfg: ModelConfig, c: TrainConfig, free: int) -> list[str]:
    """Changes to the plan that would fit ``free`` bytes, with their estimates."""
    options = []
    for label, change in (("TP={}".format(c.tp * 2), {"tensor_model_parallel_size": c.tp * 2}),
                          ("PP={}".format(c.pp * 2), {"pipeline_model_parallel_size": c.pp * 2}),
                          ("TP={} PP={}".format(c.tp * 2, c.pp * 2),
                           {"tensor_model_parallel_size": c.tp * 2, "pipeline_model_parallel_size": c.pp * 2}),
                          ("--finetune-method lora", {"finetune_method": "lora"}),
                          ("--recompute-activations", {"recompute_activations": True})):
        try:
            world = (c.world_size or c.tp * c.pp) // (c.tp * c.pp) * change.get("tensor_model_parallel_size", c.tp) \
                * change.get("pipeline_model_parallel_size", c.pp)
            alt = dataclasses.replace(c, **change, world_size=world)
            if alt == c or cfg.num_layers % alt.pp or cfg.num_kv_heads % alt.tp:
                continue
        except ConfigError:
            continue
        need = worst_rank(cfg, alt).total
        options.append(f"{label}: ~{need / GiB:.1f} GiB per GPU" + ("" if need <= free else " (still too much)"))
    return options


def check_fits(cfg: ModelConfig, c: TrainConfig, capacity: Sequence[tuple[int, int] | None]) -> RankMemory | None:
    """Refuse (ConfigError) a plan whose estimate exceeds a rank's free memory; ``capacity`` is
    (free, total) bytes per rank in rank order, None where the rank has no GPU (CPU: no check)."""
    from shared.parallel.dims import ParallelDims

    dims = ParallelDims(c.tp, c.pp, c.dp)
    worst = None
    for rank, cap in enumerate(capacity):
        if cap is None:
            continue
        free, total = cap
        need = estimate(cfg, c, dims.coords(rank)[1])
        if need.total > free:
            alts = _alternatives(cfg, c, free)
            raise ConfigError(
                f"this training plan needs about {need.total / GiB:.1f} GiB per GPU on rank {rank} (stage "
                f"{need.pp_rank}: {need.describe()} GiB) but its GPU has {free / GiB:.1f} GiB free of "
                f"{total / GiB:.1f}; " + ("try " + "; ".join(alts) if alts else "use more GPUs"))
        worst = need if worst is None or need.total > worst.total else worst
    return worst
