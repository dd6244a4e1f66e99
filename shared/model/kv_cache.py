"""A preallocated key/value cache (fixed shapes, so a GPU decode step can be graph-captured).

Slot = position: token at position p of batch row b lives in slot p of row b. A query at
position p attends to slots <= p, so slots written by right-padding are never read before
the real token of that position overwrites them.
"""

from __future__ import annotations

import torch

from shared.model.ops import write_slots


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_seq: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_seq = batch, max_seq

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """k, v (B, S, n_kv, d) into slots ``positions`` (B, S) of cache rows ``rows`` (B,)."""
        write_slots(self.k[layer], self.v[layer], k, v, positions, rows)

    def read(self, layer: int, kv_len: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_kv, kv_len, d) views of the first ``kv_len`` slots."""
        k, v = self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        if rows is not None:  # gathers only the slots read, not whole rows
            k, v = k[rows], v[rows]
        return k, v

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class CacheRows(KVCache):
    """Rows [lo, hi) of a cache, as views (writes land in the parent)."""

    def __init__(self, parent: KVCache, lo: int, hi: int):
        self.k, self.v = parent.k[:, lo:hi], parent.v[:, lo:hi]
        self.batch, self.max_seq = hi - lo, parent.max_seq
