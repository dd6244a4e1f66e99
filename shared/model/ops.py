"""The elementwise pieces of a decoder layer, each defined once, in eager and in fused form.

``EAGER`` runs them as plain torch operations (what every CPU path uses). ``compiled()`` gives
the same functions through ``torch.compile`` (inductor; dynamic shapes, so one compilation
serves every batch and sequence length): RMSNorm's eight kernels become one, the residual add
joins the next norm, RoPE and the key/value cache write become one kernel, SwiGLU one; and
attention over the cache folds each kv group's queries together instead of repeating kv
heads. The math is the same expressions, so compiled and eager agree to rounding (tests
compare them on CPU, where inductor emits C++).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics, cast back before the scale (HF's order, so bf16 matches too)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)): a residual add and the norm that follows it."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, n, d); cos/sin (B, S, d)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """k, v (B, S, n_kv, d) into slots ``positions`` (B, S) of cache rows ``rows`` (default 0..B-1)
    of one layer's caches (rows, n_kv, max_seq, d)."""
    if rows is None:
        rows = torch.arange(k.shape[0], device=k.device)
    b_idx = rows.unsqueeze(1).expand_as(positions)
    k_cache[b_idx, :, positions] = k
    v_cache[b_idx, :, positions] = v


def rope_write(q, k, v, cos, sin, k_cache, v_cache, positions):
    """RoPE on q and k, then k and v into the cache; returns the rotated q."""
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    write_slots(k_cache, v_cache, k, v, positions)
    return q


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention over the cache: q (B, S, n_q, d), keys/values (B, n_kv, L, d), additive mask
    (B, 1, S, L) -> (B, S, n_q * d). SDPA repeats each kv head for its group's queries."""
    B, S = q.shape[:2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, S, -1)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``cached_attention`` with each kv group's queries folded into the query length, so no kv
    head is repeated (a decode step reads the cache once) and every SDPA kernel, masked ones
    included, applies. The same values, computed in another order."""
    B, S, nq, d = q.shape
    G = keys.shape[1]
    r = nq // G
    folded = q.view(B, S, G, r, d).permute(0, 2, 1, 3, 4).reshape(B, G, S * r, d)  # query s*r + j
    m = mask if S == 1 else mask.repeat_interleave(r, dim=2)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=m)
    return out.view(B, G, S, r, d).permute(0, 2, 1, 3, 4).reshape(B, S, nq * d)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate ; up] on the last dim -> silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    rope_write: Callable
    swiglu: Callable
    attention: Callable  # over the KV cache


EAGER = Ops("eager", rms_norm, add_rms_norm, rope, rope_write, swiglu, cached_attention)
log = logging.getLogger("llama_svc.ops")
_compiled: Ops | None = None
_lock = threading.Lock()


def compiled() -> Ops:
    """The fused versions (compiled lazily on first call, once per process)."""
    global _compiled
    with _lock:
        if _compiled is None:
            c = lambda fn: torch.compile(fn, dynamic=True, fullgraph=True)  # noqa: E731
            _compiled = Ops("compiled", c(rms_norm), c(add_rms_norm), c(rope), c(rope_write), c(swiglu),
                            grouped_attention)  # SDPA stays a library kernel
        return _compiled


def compiled_or_eager(device: torch.device, dtype: torch.dtype) -> Ops:
    """The fused ops, tried once on small tensors of ``device``/``dtype`` (compiling them); the
    eager ones, with a warning, where compilation is not available (e.g. no Triton)."""
    ops = compiled()
    try:
        x = torch.randn(2, 2, 2, 8, device=device, dtype=dtype)
        cos = sin = torch.ones(2, 2, 8, device=device, dtype=dtype)
        w = torch.ones(8, device=device, dtype=dtype)
        kc, vc = (torch.zeros(2, 2, 4, 8, device=device, dtype=dtype) for _ in range(2))
        ops.rms_norm(x, w, 1e-5), ops.add_rms_norm(x, x, w, 1e-5), ops.swiglu(x)
        ops.rope_write(x, x, x, cos, sin, kc, vc, torch.zeros(2, 2, dtype=torch.long, device=device))
        return ops
    except Exception as e:  # noqa: BLE001 - the eager ops compute the same
        log.warning("torch.compile is not usable here (%s: %s); using the eager layer ops", type(e).__name__, e)
        return EAGER
