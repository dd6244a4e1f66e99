"""The one name/layout table between HF Llama tensors and Megatron-style TP/PP shards.

Each megatron-core parameter is a ``ParamSpec``: its name, the HF tensors it is made of and
how it is split across tensor-parallel ranks. ``shard`` and ``unshard`` are exact inverses
(bit for bit), so every format and every reshard is built from these two functions.

Splits (see the Megatron layout notes in the README):
  vocab     dim 0 after padding V -> Vp (pad rows are zero and masked at the output)
  qkv       group-major fused rows [q_g0 (r heads); k_g0; v_g0; q_g1; ...], whole groups per rank
  fc1       [gate_t ; up_t] on every rank t
  row       dim 1
  replicated  a copy on every rank
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from shared.config import ModelConfig
from shared.parallel.layout import Layout

REPLICATED, ROW, VOCAB, QKV, FC1 = "replicated", "row", "vocab", "qkv", "fc1"


@dataclass(frozen=True)
class ParamSpec:
    name: str                 # megatron-core name, with the global layer number
    hf_names: tuple[str, ...]
    kind: str
    layer: int | None = None  # global layer index, None outside the decoder layers
    stage: str = "layer"      # "first", "last" or "layer"

    def pp_rank(self, cfg: ModelConfig, layout: Layout) -> int:
        if self.stage == "first":
            return 0
        if self.stage == "last":
            return layout.pp - 1
        return self.layer // (cfg.num_layers // layout.pp)

    def local_name(self, cfg: ModelConfig, layout: Layout) -> str:
        """The name inside a pipeline stage, where layers are numbered from 0."""
        if self.layer is None:
            return self.name
        local = self.layer % (cfg.num_layers // layout.pp)
        return self.name.replace(f"decoder.layers.{self.layer}.", f"decoder.layers.{local}.", 1)


def layer_specs(cfg: ModelConfig, i: int) -> list[ParamSpec]:
    hf = f"model.layers.{i}."
    mc = f"decoder.layers.{i}."
    specs = [
        ParamSpec(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",), REPLICATED, i),
        ParamSpec(mc + "self_attention.linear_qkv.weight",
                  tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV, i),
    ]
    if cfg.qkv_bias:
        specs.append(ParamSpec(mc + "self_attention.linear_qkv.bias",
                               tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV, i))
    specs += [
        ParamSpec(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), ROW, i),
        ParamSpec(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), REPLICATED, i),
        ParamSpec(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), FC1, i),
        ParamSpec(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), ROW, i),
    ]
    return specs


def param_specs(cfg: ModelConfig, layout: Layout) -> list[ParamSpec]:
    """Every tensor of a Megatron-style checkpoint of ``cfg`` in ``layout``, in model order.

    With tied embeddings and PP > 1 the last stage keeps its own copy of the embedding as
    ``output_layer.weight`` (as megatron-core does); with PP = 1 there is no output layer tensor.
    """
    specs = [ParamSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, stage="first")]
    for i in range(cfg.num_layers):
        specs += layer_specs(cfg, i)
    specs.append(ParamSpec("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, stage="last"))
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec("output_layer.weight", ("lm_head.weight",), VOCAB, stage="last"))
    elif layout.pp > 1:
        specs.append(ParamSpec("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, stage="last"))
    return specs


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def trim_vocab(spec_or_name: "ParamSpec | str", tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A vocab tensor (a ``vocab`` spec, or an HF embedding / lm_head name) cut to the true
    vocabulary: HF files may pad the embedding, and TP shards pad it to the padded vocab.
    Any other tensor is returned as is."""
    vocab = spec_or_name.kind == VOCAB if isinstance(spec_or_name, ParamSpec) else spec_or_name in VOCAB_TENSORS
    return tensor[: cfg.vocab_size] if vocab else tensor


def is_tied_copy(spec: ParamSpec, cfg: ModelConfig) -> bool:
    """The last stage's copy of a tied embedding: the same values as the first stage's embedding."""
    return spec.name == "output_layer.weight" and cfg.tie_word_embeddings


def hf_names(cfg: ModelConfig) -> list[str]:
    """The tensor names an HF checkpoint of ``cfg`` holds."""
    names = []
    for spec in param_specs(cfg, Layout()):
        names += [n for n in spec.hf_names if n not in names]
    return names


def hf_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape ``name`` must have in an HF checkpoint of ``cfg``."""
    h, d = cfg.hidden_size, cfg.head_dim
    tail = name.split(".")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if tail[-1] == "weight" and "norm" in tail[-2]:
        return (h,)
    proj, kind = tail[-2], tail[-1]
    out_rows = {"q_proj": cfg.num_heads * d, "k_proj": cfg.num_kv_heads * d, "v_proj": cfg.num_kv_heads * d}
    if proj in out_rows:
        return (out_rows[proj], h) if kind == "weight" else (out_rows[proj],)
    return {"o_proj": (h, cfg.num_heads * d), "gate_proj": (cfg.intermediate_size, h),
            "up_proj": (cfg.intermediate_size, h), "down_proj": (h, cfg.intermediate_size)}[proj]


# ---- splitting -------------------------------------------------------------------------------

def _qkv_ungroup(cfg: ModelConfig, fused: torch.Tensor) -> list[torch.Tensor]:
    """The full group-major fused tensor [(nh+2ng)d, *rest] -> HF q, k, v."""
    ng, d, r = cfg.num_kv_heads, cfg.head_dim, cfg.queries_per_group
    rest = fused.shape[1:]
    g = fused.reshape(ng, (r + 2) * d, *rest)
    q, k, v = torch.split(g, [r * d, d, d], dim=1)
    return [q.reshape(ng * r * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)]


def shard_pieces(spec: ParamSpec, tensors: Sequence[torch.Tensor], cfg: ModelConfig,
                 layout: Layout) -> list[list[torch.Tensor]]:
    """HF tensors of ``spec`` -> per TP rank, the pieces whose concatenation along dim 0 is its shard.

    Pieces are views of the inputs wherever the split allows (row ranges are contiguous in a
    row-major tensor), so a writer can stream them to disk without assembling the shard.
    Only ``row`` pieces (column slices) and vocab padding are not plain row ranges.
    """
    T = layout.tp
    if spec.kind == REPLICATED:
        return [[tensors[0]] for _ in range(T)]
    if spec.kind == ROW:
        return [[c] for c in torch.chunk(tensors[0], T, dim=1)]
    if spec.kind == VOCAB:
        w = tensors[0]
        per = layout.padded_vocab(cfg) // T
        out = []
        for t in range(T):
            lo, hi = t * per, (t + 1) * per
            rows = [w[lo:min(hi, w.shape[0])]] if lo < w.shape[0] else []
            if hi > w.shape[0]:
                rows.append(w.new_zeros((hi - max(lo, w.shape[0]), *w.shape[1:])))
            out.append(rows)
        return out
    if spec.kind == QKV:
        q, k, v = tensors
        ng, d, r = cfg.num_kv_heads, cfg.head_dim, cfg.queries_per_group
        per = ng // T
        return [[x for g in range(t * per, (t + 1) * per)
                 for x in (q[g * r * d:(g + 1) * r * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d])]
                for t in range(T)]
    if spec.kind == FC1:
        gates, ups = torch.chunk(tensors[0], T, dim=0), torch.chunk(tensors[1], T, dim=0)
        return [[g, u] for g, u in zip(gates, ups)]
    raise ValueError(f"unknown split kind {spec.kind!r}")


def join_pieces(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous tensor from ``shard_pieces`` output for one rank."""
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(list(pieces), dim=0)


def shard(spec: ParamSpec, tensors: Sequence[torch.Tensor], cfg: ModelConfig, layout: Layout) -> list[torch.Tensor]:
    """HF tensors of ``spec`` -> one contiguous tensor per TP rank."""
    return [join_pieces(p) for p in shard_pieces(spec, tensors, cfg, layout)]


def unshard(spec: ParamSpec, shards: Sequence[torch.Tensor], cfg: ModelConfig, layout: Layout) -> list[torch.Tensor]:
    """Inverse of ``shard``: TP shards -> the HF tensors of ``spec``."""
    if len(shards) != layout.tp:
        raise ValueError(f"{spec.name}: expected {layout.tp} TP shards, got {len(shards)}")
    if spec.kind == REPLICATED:
        return [shards[0]]
    if spec.kind == ROW:
        return [torch.cat(list(shards), dim=1)]
    if spec.kind == VOCAB:
        return [trim_vocab(spec, torch.cat(list(shards), dim=0), cfg)]
    if spec.kind == QKV:
        return _qkv_ungroup(cfg, torch.cat(list(shards), dim=0))
    if spec.kind == FC1:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)]
    raise ValueError(f"unknown split kind {spec.kind!r}")


# ---- whole state dicts (in memory) ----------------------------------------------------------

def hf_to_shards(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, layout: Layout,
                 ranks: Iterable[tuple[int, int]] | None = None) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """HF state dict -> {(tp_rank, pp_rank): local megatron state dict}."""
    layout.check(cfg)
    wanted = set(ranks) if ranks is not None else set(layout.ranks())
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {r: {} for r in wanted}
    for spec in param_specs(cfg, layout):
        p = spec.pp_rank(cfg, layout)
        if not any(rp == p for _, rp in wanted):
            continue
        pieces = shard(spec, [hf[n] for n in spec.hf_names], cfg, layout)
        for t, piece in enumerate(pieces):
            if (t, p) in wanted:
                out[(t, p)][spec.local_name(cfg, layout)] = piece
    return out


def shards_to_hf(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], cfg: ModelConfig,
                 layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of ``hf_to_shards`` (needs every rank)."""
    out: dict[str, torch.Tensor] = {}
    for spec in param_specs(cfg, layout):
        if is_tied_copy(spec, cfg):
            continue
        p = spec.pp_rank(cfg, layout)
        local = spec.local_name(cfg, layout)
        tensors = unshard(spec, [shards[(t, p)][local] for t in range(layout.tp)], cfg, layout)
        out.update(zip(spec.hf_names, tensors))
    return out
