"""What the streaming parity check holds at once, worked out from shapes alone (no weights).

Both sides run one decoder layer at a time through buffers allocated once per pass: the
reference holds one whole layer, each of the T candidate ranks its shard of that layer. The
embedding and the output layer go through in blocks of R rows, after the layer buffers are
freed. So the peak grows with one layer and the vocabulary, never with the number of layers:

    peak = max(layers, head)
    layers = c·(P_layer + T·P_shard) + (1 + T)·(c·R·h + X) + A
    head   = (1 + T)·(c·R·h + R·h·(s + w)) + (2 + 3T)·B·S·Vp·4

with c the compute dtype's bytes (w the weights', s the source's), P_layer one layer's
parameters, P_shard one TP rank's part of them (P_layer/T plus the replicated norms), X the
largest tensor mapped at once while a layer is copied in (the source's gate or up projection,
and its cast where the dtypes differ; on a rank its fc1 shard), A the activations of one layer
on both sides (B·S·(8h + 4I)·c plus the attention scores B·n_h·S²·c) and the last term the fp32
logits (reference, candidate, and the ranks' gather) for B prompts of S tokens and the padded
vocabulary Vp. Where the greedy continuation runs (small models only: it re-reads every weight
per token), both sides also keep a KV cache, 4·L·B·n_kv·(S + n)·d·c for n tokens. Every process
carries its interpreter too (1 + T processes when T > 1; at T = 1 the candidate runs in the
calling process).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from shared.config import ModelConfig
from shared.checkpoint import layout as param_layout
from shared.checkpoint.layout import Layout
from shared.checkpoint.native import shard_shape
from shared.files import release_freed_memory

BLOCK_BYTES = 64 << 20          # one embedding / output-layer block in the compute dtype
GREEDY_TOKENS = 4
GREEDY_BUDGET_BYTES = 4 << 30   # greedy decoding re-reads every weight per token: only below this


def _numel(shape) -> int:
    return torch.Size(shape).numel()


@dataclass(frozen=True)
class Plan:
    tp: int
    pp: int
    batch: int
    seq: int
    block_rows: int
    reference_layer_bytes: int
    candidate_shard_bytes: int      # per rank
    read_bytes: int                 # per process, the largest tensor mapped or cast at once
    block_bytes: int                # per process
    block_read_bytes: int           # per process, one block of a vocab tensor mapped (and cast)
    activation_bytes: int
    logits_bytes: int
    cache_bytes: int                # both sides' KV caches, when the greedy continuation runs
    greedy_tokens: int
    model_weight_bytes: int
    greedy_note: str = ""           # why there is no greedy continuation, if there is none

    @property
    def processes(self) -> int:
        return 1 + self.tp if self.tp > 1 else 1

    @property
    def layers_bytes(self) -> int:
        return (self.reference_layer_bytes + self.tp * self.candidate_shard_bytes
                + (1 + self.tp) * (self.block_bytes + self.read_bytes) + self.activation_bytes + self.cache_bytes)

    @property
    def head_bytes(self) -> int:
        return (1 + self.tp) * (self.block_bytes + self.block_read_bytes) + self.logits_bytes + self.cache_bytes

    @property
    def peak_bytes(self) -> int:
        """Everything the check holds at once, over all its processes (interpreters excluded)."""
        return max(self.layers_bytes, self.head_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "layers_bytes": self.layers_bytes, "head_bytes": self.head_bytes,
                "peak_bytes": self.peak_bytes, "processes": self.processes}


def resident(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with real (uninitialised) storage: a layer buffer stays on the meta device between passes."""
    if next(module.parameters()).is_meta:
        module.to_empty(device="cpu")
    return module


def evict(module: torch.nn.Module) -> None:
    """Free ``module``'s storage (back to the meta device) and give the pages back to the kernel."""
    module.to("meta")
    release_freed_memory()


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (the reference's module)."""
    return sum(_numel(param_layout.hf_shape(cfg, n)) for spec in param_layout.layer_specs(cfg, 0) for n in spec.hf_names)


def shard_params(cfg: ModelConfig, layout: Layout) -> int:
    """Parameters of one TP rank's shard of one decoder layer."""
    return sum(_numel(shard_shape(spec, cfg, layout)) for spec in param_layout.layer_specs(cfg, 0))


def make_plan(cfg: ModelConfig, layout: Layout, weights: torch.dtype, compute: torch.dtype, batch: int, seq: int,
              source: torch.dtype | None = None, block_bytes: int = BLOCK_BYTES,
              greedy_tokens: int | None = None) -> Plan:
    """The plan for ``batch`` prompts of ``seq`` tokens; ``greedy_tokens=None`` decides by cost."""
    c, w = compute.itemsize, weights.itemsize
    s = (source or weights).itemsize
    cast = w if (source or weights) != weights else 0
    h, inter, T = cfg.hidden_size, cfg.intermediate_size, layout.tp
    vp = layout.padded_vocab(cfg)
    rows = max(1, min(vp, block_bytes // (h * c)))
    weight_bytes = cfg.num_parameters() * w
    note = "" if greedy_tokens is None else "none was asked for"
    if greedy_tokens is None:
        greedy_tokens = GREEDY_TOKENS if GREEDY_TOKENS * weight_bytes <= GREEDY_BUDGET_BYTES else 0
        note = f"it would re-read all {weight_bytes / 1e9:.1f} GB of weights per token"
    longest = seq + greedy_tokens  # positions in the KV cache
    return Plan(
        tp=T, pp=layout.pp, batch=batch, seq=seq, block_rows=rows,
        reference_layer_bytes=c * layer_params(cfg), candidate_shard_bytes=c * shard_params(cfg, layout),
        read_bytes=max(inter * h * (s + cast), 2 * inter // T * h * w),
        block_bytes=rows * h * c, block_read_bytes=rows * h * (s + cast),
        activation_bytes=2 * batch * seq * ((8 * h + 4 * inter) * c + cfg.num_heads * longest * c),
        logits_bytes=(2 + 3 * T) * batch * seq * vp * 4,
        cache_bytes=4 * cfg.num_layers * batch * cfg.num_kv_heads * longest * cfg.head_dim * c if greedy_tokens else 0,
        greedy_tokens=greedy_tokens, model_weight_bytes=weight_bytes, greedy_note=note if not greedy_tokens else "")
