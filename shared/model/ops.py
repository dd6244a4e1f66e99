"""The elementwise pieces of a decoder layer, each defined once, in eager and in fused form.

``EAGER`` runs them as plain torch operations (what every CPU path uses). ``compiled()`` gives
the same functions through ``torch.compile`` (inductor; dynamic shapes, so one compilation
serves every batch and sequence length): RMSNorm's eight kernels become one, the residual add
joins the next norm, RoPE and the key/value cache write become one kernel, SwiGLU one. The
math is the same expressions, so compiled and eager agree to rounding (tests compare them on
CPU, where inductor emits C++).
"""

from __future__ import annotations

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


EAGER = Ops("eager", rms_norm, add_rms_norm, rope, rope_write, swiglu)
_compiled: Ops | None = None
_lock = threading.Lock()


def compiled() -> Ops:
    """The fused versions (compiled lazily on first call, once per process)."""
    global _compiled
    with _lock:
        if _compiled is None:
            c = lambda fn: torch.compile(fn, dynamic=True, fullgraph=True)  # noqa: E731
            _compiled = Ops("compiled", c(rms_norm), c(add_rms_norm), c(rope), c(rope_write), c(swiglu))
        return _compiled
