"""RMSNorm, attention, MLP and one decoder layer, named as megatron-core names them.

Every layer is plain torch (``shared.parallel.layers`` for the tensor-parallel linears). Other
implementations (packed CPU kernels, a native decode step; later Transformer Engine) are
applied to a built model by the inference engine (``shared.inference.impls``), overriding
``forward`` or the linears' ``product``; they keep the parameter names, so the checkpoint
schema never depends on the implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ModelConfig
from shared.model.kv_cache import KVCache
from shared.model.ops import EAGER, Ops, rms_norm
from shared.parallel.layers import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype=torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, group, dtype, device):
        super().__init__()
        self.d = cfg.head_dim
        self.r = cfg.queries_per_group
        self.groups = cfg.num_kv_heads // tp  # kv groups on this rank
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, cfg.qkv_rows, group=group, bias=cfg.qkv_bias,
                                               dtype=dtype, device=device)
        self.linear_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, group=group,
                                             dtype=dtype, device=device)

    def forward(self, x, cos, sin, layer: int, position_ids, cache: KVCache | None, kv_len: int | None,
                cache_rows: torch.Tensor | None, mask: torch.Tensor | None = None, ops: Ops = EAGER):
        B, S, _ = x.shape
        qkv = self.linear_qkv(x).view(B, S, self.groups, self.r + 2, self.d)  # group-major
        q = qkv[:, :, :, : self.r].reshape(B, S, self.groups * self.r, self.d)
        k, v = qkv[:, :, :, self.r], qkv[:, :, :, self.r + 1]  # (B, S, n_kv, d)
        if cache is None:
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=S > 1, enable_gqa=True)
        else:
            if cache_rows is None:
                q = ops.rope_write(q, k, v, cos, sin, cache.k[layer], cache.v[layer], position_ids)
            else:
                q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
                cache.write(layer, k, v, position_ids, cache_rows)
            keys, values = cache.read(layer, kv_len, cache_rows)  # (B, n_kv, kv_len, d)
            if mask is None:
                mask = cache_mask(position_ids, kv_len, q.dtype)
            return self.linear_proj(ops.attention(q, keys, values, mask))
        return self.linear_proj(out.transpose(1, 2).reshape(B, S, -1))


def cache_mask(position_ids: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, S, kv_len) additive mask in ``dtype`` (0 or -inf), made once per step for every
    layer: a query at position p sees cache slots <= p."""
    slots = torch.arange(kv_len, device=position_ids.device)
    hidden = (slots.view(1, 1, kv_len) > position_ids.unsqueeze(-1)).unsqueeze(1)
    return torch.zeros(hidden.shape, dtype=dtype, device=position_ids.device).masked_fill_(hidden, float("-inf"))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group, dtype, device):
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.intermediate_size, group=group,
                                               dtype=dtype, device=device)
        self.linear_fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, group=group, dtype=dtype,
                                            device=device)

    def forward(self, x, ops: Ops = EAGER):
        return self.linear_fc2(ops.swiglu(self.linear_fc1(x)))  # [gate_t ; up_t] per rank


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, group, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attention = SelfAttention(cfg, tp, group, dtype, device)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, group, dtype, device)

    def forward(self, x, cos, sin, layer, position_ids, cache, kv_len, cache_rows, mask=None, ops: Ops = EAGER):
        n1, n2 = self.input_layernorm, self.pre_mlp_layernorm
        a = self.self_attention(ops.rms_norm(x, n1.weight, n1.eps), cos, sin, layer, position_ids, cache, kv_len,
                                cache_rows, mask, ops)
        x, h = ops.add_rms_norm(x, a, n2.weight, n2.eps)
        return x + self.mlp(h, ops)
