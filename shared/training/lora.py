"""LoRA adapters on the tensor-parallel linears: y = W x + (alpha / r) * B (A x).

Column-parallel layer (W_t holds output rows): A (r, in) is replicated and B_t holds B's rows of
this rank, so ``x A^T`` is all-reduced in backward like the layer's input. Row-parallel layer (W_t
holds input columns): A_t holds A's columns of this rank, ``x_t A_t^T`` is all-reduced forward,
and B (out, r) is replicated. Either way ``merged()`` equals the layer's local shard of
W + (alpha / r) B A, so a merged export is an ordinary checkpoint.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from shared.parallel.comm import copy_to_tp, reduce_from_tp
from shared.parallel.layers import ColumnParallelLinear, RowParallelLinear, _tp_rank, _tp_size


class LoRALinear(nn.Module):
    """A column- or row-parallel linear (same ``weight``/``bias`` names) plus ``lora_A``/``lora_B``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, seed: int, key: str):
        super().__init__()
        self.row = isinstance(base, RowParallelLinear)
        if not self.row and not isinstance(base, ColumnParallelLinear):
            raise TypeError(f"LoRA supports column/row-parallel linears, not {type(base).__name__}")
        self.group = base.group
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        tp, t = _tp_size(self.group), _tp_rank(self.group)
        out_local, in_local = self.weight.shape
        in_full = in_local * tp if self.row else in_local
        # A from the full matrix so every TP layout starts from the same adapter (PEFT's init)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform(a=sqrt(5))
        a = (torch.rand(rank, in_full, generator=g) * 2 - 1) * bound
        if self.row:
            a = a[:, t * in_local:(t + 1) * in_local]
        dev = self.weight.device
        self.lora_A = nn.Parameter(a.to(torch.float32).to(dev).contiguous())
        self.lora_B = nn.Parameter(torch.zeros(out_local, rank, dtype=torch.float32, device=dev))
        # replicated factors have equal values and gradients on every TP rank: count them once
        (self.lora_B if self.row else self.lora_A).tp_replicated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        if self.row:
            base = reduce_from_tp(F.linear(x, self.weight), self.group)
            a = reduce_from_tp(a, self.group)
        else:
            base = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
            a = copy_to_tp(a, self.group)
        return base + (self.scale * F.linear(a, self.lora_B)).to(base.dtype)

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        """This rank's shard of W + scale * B A, in W's dtype."""
        return (self.weight.float() + self.scale * (self.lora_B @ self.lora_A)).to(self.weight.dtype)


def apply_lora(stage: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float,
               seed: int, layer_offset: int) -> list[str]:
    """Freeze ``stage`` and put adapters on the ``targets`` linears; returns the adapted module names."""
    for p in stage.parameters():
        p.requires_grad_(False)
    done = []
    for i, layer in enumerate(stage.decoder.layers):
        for owner_name, owner in (("self_attention", layer.self_attention), ("mlp", layer.mlp)):
            for attr in targets:
                if hasattr(owner, attr):
                    key = f"decoder.layers.{layer_offset + i}.{owner_name}.{attr}"  # global layer: PP-independent
                    setattr(owner, attr, LoRALinear(getattr(owner, attr), rank, alpha, dropout, seed, key))
                    done.append(f"decoder.layers.{i}.{owner_name}.{attr}")
    return done


def lora_modules(stage: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in stage.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(stage: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in stage.state_dict().items() if ".lora_" in k}


def base_state(stage: nn.Module, merge: bool = False) -> dict[str, torch.Tensor]:
    """The stage's checkpoint tensors without adapters; ``merge`` folds them into their weights."""
    out = {k: v for k, v in stage.state_dict().items() if ".lora_" not in k}
    if merge:
        for name, mod in lora_modules(stage).items():
            out[f"{name}.weight"] = mod.merged()
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}
