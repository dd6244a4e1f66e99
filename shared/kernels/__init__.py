"""Native CPU kernels, built on first use with the machine's C compiler.

``packed_matmul.c``: fp32 matrix products against weights stored as 8-column panels
(``pack``), the layout that lets a decode step stream each weight once at memory speed -
about twice the throughput of torch's matrix-vector kernels on small batches. Only the
inference engine packs its weights (``pack_module``); the model's ``linear`` dispatches on
the layout, so nothing else changes.

The library is compiled with ``-O3 -march=native`` into ``$LLAMA_MEGATRON_CACHE`` (default
``~/.cache/llama-megatron-svc``) keyed by the source's hash. Where there is no compiler, or
the CPU lacks AVX2/FMA, ``available()`` is False and the engine keeps torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PANEL = 8
_SOURCE = Path(__file__).with_name("packed_matmul.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_MEGATRON_CACHE", Path.home() / ".cache" / "llama-megatron-svc")) / "kernels"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _cpu_supported() -> bool:
    flags = _cpu_flags().split()
    return "avx2" in flags and "fma" in flags


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not _cpu_supported():
        log.info("native CPU kernels unavailable (%s); using torch's", "no C compiler" if compiler is None
                 else "no AVX2/FMA")
        return None
    # built for this CPU (-march=native): the key covers the source, the flags and the CPU's features
    key = _SOURCE.read_bytes() + " ".join(_FLAGS + [compiler, _cpu_flags()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    target = cache_dir() / f"packed_matmul-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("building the native CPU kernels failed; using torch's:\n%s", r.stderr[-2000:])
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    vp, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.packed_matmul.argtypes = [vp] * 4 + [i] * 3
    lib.decode_attention.argtypes = [vp, vp, f] + [vp] * 8 + [i] * 6 + [vp, vp]
    lib.decode_mlp.argtypes = [vp, vp, f, vp, vp, i, i, i, vp, vp]
    lib.decode_layers.argtypes = [i, vp] + [vp] * 7 + [f, vp, vp, vp, vp, ctypes.c_long, vp] + [i] * 7 + [vp]
    for fn in (lib.packed_matmul, lib.decode_attention, lib.decode_mlp, lib.decode_layers):
        fn.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            _lib = _build()
    return _lib


def available() -> bool:
    return _library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> panels [N/8, K, 8] (a copy). N must be a multiple of 8."""
    n, k = weight.shape
    return weight.detach().reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack``: [N/8, K, 8] -> [N, K]."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])


def packable(weight: torch.Tensor) -> bool:
    return (weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.shape[0] % PANEL == 0)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, unpack(packed), bias)`` for fp32 CPU tensors, without unpacking."""
    lib = _library()
    k = packed.shape[1]
    n = packed.shape[0] * PANEL
    if lib is None or x.dtype != torch.float32 or torch.is_grad_enabled() and (x.requires_grad or packed.requires_grad):
        return torch.nn.functional.linear(x, unpack(packed), bias)
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else None
    lib.packed_matmul(x2.data_ptr(), packed.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                      x2.shape[0], k, n)
    return y.view(*x.shape[:-1], n)


def embedding(ids: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, unpack(packed))``: rows gathered from the panels."""
    return packed[ids // PANEL, :, ids % PANEL]


def _ptr(t: torch.Tensor | None):
    return t.data_ptr() if t is not None else None


def decode_attention(x: torch.Tensor, ln_weight: torch.Tensor, eps: float, qkv: torch.Tensor, qkv_bias,
                     proj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor, groups: int, r: int, d: int) -> torch.Tensor:
    """The attention half of a layer for one new token per row, in one native call.

    x (B, H); k_cache/v_cache this layer's (B, groups, max_seq, d), written at ``positions`` (B,).
    Returns this rank's attention output projection (B, H), before the tensor-parallel reduce.
    """
    lib = _library()
    B, H = x.shape
    qkv_n, attn_n = groups * (r + 2) * d, groups * r * d
    out = torch.empty(B, H, dtype=torch.float32)
    scratch = torch.empty(B * (H + qkv_n + attn_n), dtype=torch.float32)
    pos = positions.to(torch.long).contiguous()
    lib.decode_attention(x.data_ptr(), ln_weight.data_ptr(), ctypes.c_float(eps), qkv.data_ptr(), _ptr(qkv_bias),
                         proj.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         pos.data_ptr(), B, H, groups, r, d, k_cache.shape[2], out.data_ptr(), scratch.data_ptr())
    return out


def decode_mlp(x: torch.Tensor, ln_weight: torch.Tensor, eps: float, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """The MLP half of a layer (B, H) -> this rank's (B, H), before the tensor-parallel reduce."""
    lib = _library()
    B, H = x.shape
    F = fc2.shape[1]
    out = torch.empty(B, H, dtype=torch.float32)
    scratch = torch.empty(B * (H + 3 * F), dtype=torch.float32)
    lib.decode_mlp(x.data_ptr(), ln_weight.data_ptr(), ctypes.c_float(eps), fc1.data_ptr(), fc2.data_ptr(), B, H, F,
                   out.data_ptr(), scratch.data_ptr())
    return out


class StageDecoder:
    """All layers of a tensor-parallel-size-1 stage in one native call per decode step.

    Built once from the (packed) layer modules: the per-layer weight pointers are gathered
    here, so a step costs one call instead of a few hundred small torch operations.
    """

    def __init__(self, layers, eps: float, groups: int, r: int, d: int) -> None:
        n = len(layers)
        arr = ctypes.c_void_p * n
        self._keep: list = []  # the tensors (and pointer arrays) the native call reads

        def ptrs(get):
            tensors = [get(m) for m in layers]
            table = arr(*[t.data_ptr() for t in tensors])
            self._keep += [tensors, table]
            return ctypes.addressof(table)

        a = [m.self_attention for m in layers]
        self.ln1 = ptrs(lambda m: m.input_layernorm.weight)
        self.qkv = ptrs(lambda m: m.self_attention.linear_qkv.weight)
        self.bqkv = ptrs(lambda m: m.self_attention.linear_qkv.bias) if a[0].linear_qkv.bias is not None else None
        self.proj = ptrs(lambda m: m.self_attention.linear_proj.weight)
        self.ln2 = ptrs(lambda m: m.pre_mlp_layernorm.weight)
        self.fc1 = ptrs(lambda m: m.mlp.linear_fc1.weight)
        self.fc2 = ptrs(lambda m: m.mlp.linear_fc2.weight)
        self.n, self.eps, self.groups, self.r, self.d = n, eps, groups, r, d
        self.ffn = layers[0].mlp.linear_fc2.weight.shape[1]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H) -> (B, H) after every layer; caches (L, B, groups, max_seq, d) written at ``positions``."""
        lib = _library()
        B, H = x.shape
        h = x.contiguous().clone()
        qkv_n, attn_n = self.groups * (self.r + 2) * self.d, self.groups * self.r * self.d
        scratch = torch.empty(B * (2 * H + max(qkv_n + attn_n, 3 * self.ffn)), dtype=torch.float32)
        pos = positions.to(torch.long).contiguous()
        lib.decode_layers(self.n, h.data_ptr(), self.ln1, self.qkv, self.bqkv, self.proj, self.ln2, self.fc1, self.fc2,
                          ctypes.c_float(self.eps), cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
                          k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), pos.data_ptr(), B, H,
                          self.groups, self.r, self.d, k_cache.shape[3], self.ffn, scratch.data_ptr())
        return h
