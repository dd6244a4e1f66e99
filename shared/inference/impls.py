"""How a rank runs its built stage: implementations the inference engine applies after loading.

The model (``shared.model``) builds plain torch layers and knows no kernel or weight format. It
exposes plain hooks: the linears' ``product`` and the embedding's ``lookup``
(``shared.parallel.layers``), each decoder layer's ``forward``, the stage's ``run_layers``,
``logits`` and elementwise ``ops``. An implementation rewrites a built stage in place by
rebinding modules to subclasses that override those hooks (the way
``torch.nn.utils.parametrize`` does), so every module, parameter name and state_dict key stays;
only a weight's storage may change. ``IMPLS`` holds them by name:

  torch          the stage as built: row-major weights, torch's kernels
  column-major   matrices stored transposed (same values, shape and names): torch's CPU
                 matrix-vector kernel reads them ~1.4x faster than row-major
  packed         fp32 CPU weights as 8-column panels for the native kernels (``shared.kernels``),
                 streamed once per product at memory speed; a product of ``GEMM_FROM_ROWS``
                 rows or more (prefill, scoring) unpacks its matrix and runs torch's GEMM
  native-decode  after ``packed``: a decode step (one new token per row, with the cache) in one
                 native call per stage (tensor parallel size 1) or two per layer
  compiled       the layers' elementwise ops fused by ``torch.compile`` (``shared.model.ops``)

An ``ImplPlan`` is the list a rank applies, in order, with the crossover of its products; so
per phase: decode steps run the packed kernels, prefill and scoring run them below the
crossover and torch's GEMM above. The CUDA graphs of the GPU decode step (``cuda_graphs``)
wrap the stage once its cache exists; the worker captures them when its ``DecodePlan`` asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shared import kernels
from shared.model import LlamaStage
from shared.model.layers import TransformerLayer
from shared.model.ops import EAGER, Ops
from shared.parallel.comm import reduce_from_tp
from shared.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    vocab_parallel_logits)

# Rows (tokens in one product) from which torch's GEMM on the unpacked matrix beats the packed
# kernel, measured by ``python bench/kernels.py --logits`` (SmolLM2-135M's shapes, 2 threads;
# its docstring says what it times). There, packed / GEMM time of a layer's four matrices was
# 0.89 at 32 rows, 1.0 at 48, 1.22 at 64, 1.38 at 96 and 1.7-1.9 at 256-512; of the output
# projection (a tall vocab x hidden matrix, dearer to unpack) 0.78 at 64, 1.13 at 128, 1.25 at
# 192 and 1.5 at 512.
GEMM_FROM_ROWS = 64
LOGITS_GEMM_FROM_ROWS = 192


class Packing:
    """The packed products of one stage: the crossovers, and one scratch matrix that a product
    above its crossover unpacks its weight into (one product at a time, reused)."""

    def __init__(self, gemm_from_rows: int = GEMM_FROM_ROWS, logits_gemm_from_rows: int = LOGITS_GEMM_FROM_ROWS):
        self.gemm_from_rows, self.logits_gemm_from_rows = gemm_from_rows, logits_gemm_from_rows
        self._scratch = torch.empty(0)

    def unpacked_t(self, packed: torch.Tensor) -> torch.Tensor:
        """W^T (K, N), row-major, of panels (N/8, K, 8), in the scratch buffer."""
        j, k, p = packed.shape
        if self._scratch.numel() < j * k * p:
            self._scratch = torch.empty(j * k * p, dtype=packed.dtype)
        wt = self._scratch[: j * k * p].view(k, j, p)
        wt.copy_(packed.permute(1, 0, 2))
        return wt.view(k, j * p)

    def product(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                from_rows: int | None = None) -> torch.Tensor:
        """``x W^T (+ b)``: the packed kernel, or torch's GEMM for several tokens per row and at
        least ``from_rows`` rows in all (default: the decoder layers' crossover)."""
        from_rows = self.gemm_from_rows if from_rows is None else from_rows
        if x.dim() > 2 and x.shape[-2] > 1 and x.numel() // x.shape[-1] >= from_rows:
            return F.linear(x, self.unpacked_t(packed).t(), bias)
        return kernels.packed_linear(x, packed, bias)


class PackedColumnParallelLinear(ColumnParallelLinear):
    packing: Packing

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.product(x, self.weight, self.bias)


class PackedRowParallelLinear(RowParallelLinear):
    packing: Packing

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.product(x, self.weight)


class PackedVocabParallelEmbedding(VocabParallelEmbedding):
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding(ids, self.weight)


class PackedStage(LlamaStage):
    """A stage whose matrices are packed where they can be (the output projection among them)."""

    packing: Packing

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.output_weight()
        if weight.dim() != 3:  # a vocab slice that is no multiple of the panel width
            return super().logits(h)

        def product(x, w):
            return self.packing.product(x, w, from_rows=self.packing.logits_gemm_from_rows)

        return vocab_parallel_logits(h, weight, self.cfg.vocab_size, self.ctx.tp_group, product)


_PACKED = {ColumnParallelLinear: PackedColumnParallelLinear, RowParallelLinear: PackedRowParallelLinear,
           VocabParallelEmbedding: PackedVocabParallelEmbedding}


def _native_ready(x: torch.Tensor) -> bool:
    """One new token per row, fp32 on CPU, no autograd: what the native decode kernels take."""
    return x.shape[1] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


class NativeDecodeLayer(TransformerLayer):
    """A layer with packed linears whose decode step is two native calls (attention, MLP)."""

    def _native_decode(self, x: torch.Tensor) -> bool:
        return _native_ready(x)

    def forward(self, x, cos, sin, layer, position_ids, cache, kv_len, cache_rows, mask=None, ops: Ops = EAGER):
        if cache is None or cache_rows is not None or not self._native_decode(x):
            return super().forward(x, cos, sin, layer, position_ids, cache, kv_len, cache_rows, mask, ops)
        att, mlp = self.self_attention, self.mlp
        B, _, H = x.shape
        h = x.reshape(B, H).contiguous()
        k, v = cache.k[layer], cache.v[layer]
        if not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError("the native decode step needs a contiguous cache")
        o = kernels.decode_attention(
            h, self.input_layernorm.weight, self.input_layernorm.eps, att.linear_qkv.weight, att.linear_qkv.bias,
            att.linear_proj.weight, cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous(), k, v,
            position_ids.reshape(B), att.groups, att.r, att.d)
        h = h + reduce_from_tp(o, att.linear_proj.group)
        m = kernels.decode_mlp(h, self.pre_mlp_layernorm.weight, self.pre_mlp_layernorm.eps,
                               mlp.linear_fc1.weight, mlp.linear_fc2.weight)
        h = h + reduce_from_tp(m, mlp.linear_fc2.group)
        return h.view(B, 1, H)


class NativeDecodeStage(PackedStage):
    """A tensor-parallel-size-1 stage whose decode step is one native call over all its layers."""

    native_step: kernels.StageDecoder

    def run_layers(self, h, cos, sin, position_ids, cache, kv_len, cache_rows):
        if cache is None or cache_rows is not None or not _native_ready(h):
            return super().run_layers(h, cos, sin, position_ids, cache, kv_len, cache_rows)
        B = h.shape[0]
        return self.native_step(h.reshape(B, -1), cos.reshape(B, -1), sin.reshape(B, -1), cache.k, cache.v,
                                position_ids.reshape(B)).view(B, 1, -1)


# ---- the registry ----------------------------------------------------------------------------

def _rebind(module: nn.Module, cls: type) -> None:
    """Make ``module`` an instance of ``cls`` (a subclass of its class that overrides hooks only)."""
    if isinstance(module, cls):
        return
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} does not extend {type(module).__name__}")
    module.__class__ = cls


def _column_major(stage: LlamaStage, plan: "ImplPlan") -> None:
    with torch.no_grad():
        for p in stage.parameters():
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()


def _packed(stage: LlamaStage, plan: "ImplPlan") -> None:
    """Pack every packable matrix of the stage (the rest stay torch's, column-major)."""
    packing = Packing(plan.gemm_from_rows, plan.logits_gemm_from_rows)
    with torch.no_grad():
        for module in stage.modules():
            cls = _PACKED.get(type(module))
            if cls is not None and kernels.packable(module.weight):
                module.weight.requires_grad_(False)
                module.weight.data = kernels.pack(module.weight.data)
                module.packing = packing
                _rebind(module, cls)
        output = getattr(stage, "output_layer", None)
        if output is not None and kernels.packable(output.weight):
            output.weight.requires_grad_(False)
            output.weight.data = kernels.pack(output.weight.data)
        _column_major(stage, plan)
    stage.packing = packing
    _rebind(stage, PackedStage)


def _linears(layer: TransformerLayer) -> tuple[nn.Module, ...]:
    att, mlp = layer.self_attention, layer.mlp
    return att.linear_qkv, att.linear_proj, mlp.linear_fc1, mlp.linear_fc2


def _native_decode(stage: LlamaStage, plan: "ImplPlan") -> None:
    """Decode steps in native calls: per layer whose linears are all packed, and per stage when
    every layer is and the stage is not tensor-parallel."""
    layers = list(stage.decoder.layers)
    native = [layer for layer in layers if all(isinstance(m, (PackedColumnParallelLinear, PackedRowParallelLinear))
                                               for m in _linears(layer))]
    for layer in native:
        _rebind(layer, NativeDecodeLayer)
    if stage.ctx.tp == 1 and layers and len(native) == len(layers) and type(stage) is PackedStage:
        first = layers[0].self_attention
        stage.native_step = kernels.StageDecoder(layers, layers[0].input_layernorm.eps, first.groups, first.r,
                                                 first.d)
        _rebind(stage, NativeDecodeStage)


def _compiled(stage: LlamaStage, plan: "ImplPlan") -> None:
    from shared.model.ops import compiled_or_eager

    stage.ops = compiled_or_eager(stage.ctx.device, stage.dtype)


IMPLS: dict[str, Callable[[LlamaStage, "ImplPlan"], None]] = {
    "torch": lambda stage, plan: None,
    "column-major": _column_major,
    "packed": _packed,
    "native-decode": _native_decode,
    "compiled": _compiled,
}


@dataclass(frozen=True)
class ImplPlan:
    """The implementations (``IMPLS`` names) a rank applies to its built stage, in order."""

    impls: tuple[str, ...] = ("torch",)
    gemm_from_rows: int = GEMM_FROM_ROWS                # packed: torch's GEMM from this many rows
    logits_gemm_from_rows: int = LOGITS_GEMM_FROM_ROWS  # the same for the output projection

    def __post_init__(self) -> None:
        unknown = [name for name in self.impls if name not in IMPLS]
        if unknown:
            raise ValueError(f"unknown implementation(s) {unknown}; available: {sorted(IMPLS)}")
        if "native-decode" in self.impls and "packed" not in self.impls[: self.impls.index("native-decode")]:
            raise ValueError("native-decode runs on packed weights: put 'packed' before it")

    @classmethod
    def for_cpu(cls, dtype: torch.dtype) -> "ImplPlan":
        """fp32 with the native kernels: packed weights and native decode steps; otherwise torch's
        kernels on column-major matrices."""
        if dtype == torch.float32 and kernels.available():
            return cls(("packed", "native-decode"))
        return cls(("column-major",))

    @classmethod
    def choose(cls, device_type: str, dtype: torch.dtype, compiled: bool) -> "ImplPlan":
        if compiled:
            return cls(("compiled",))
        return cls.for_cpu(dtype) if device_type == "cpu" else cls()

    @property
    def weight_layout(self) -> str:
        return next((n for n in ("packed", "column-major") if n in self.impls), "row-major")

    def apply(self, stage: LlamaStage) -> LlamaStage:
        for name in self.impls:
            IMPLS[name](stage, self)
        return stage


def cpu_weight_layout(stage: LlamaStage) -> str:
    """Apply the CPU plan for the stage's dtype (``ImplPlan.for_cpu``); returns its weight layout."""
    plan = ImplPlan.for_cpu(stage.dtype)
    plan.apply(stage)
    return plan.weight_layout
