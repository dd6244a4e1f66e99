"""The decode step as replayed CUDA graphs (single pipeline stage, CUDA only).

One graph per (batch bucket, kv-length bucket): batch rounded up to a power of two (at most
the cache's rows), kv length up to a multiple of ``kv_step`` (slots beyond a row's position
are masked, so reading a few more is harmless). Static inputs are filled with the real step
before a graph is captured: the warm-up and capture runs then compute exactly that step,
and rewriting the same K/V into the same slots is idempotent. Padding rows run token 0 at
position 0 of rows that hold no live sequence.
"""

from __future__ import annotations

import torch

from shared.model import KVCache, LlamaStage


class GraphedDecode:
    def __init__(self, stage: LlamaStage, cache: KVCache, kv_step: int = 256):
        self.stage, self.cache, self.kv_step = stage, cache, kv_step
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def _buckets(self, hi: int, kv_len: int) -> tuple[int, int]:
        b = 1
        while b < hi:
            b *= 2
        kv = -(-kv_len // self.kv_step) * self.kv_step
        return min(b, self.cache.batch), min(kv, self.cache.max_seq)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """ids, pos (hi, 1) on the GPU -> logits (hi, 1, V)."""
        from shared.inference.worker import CacheRows

        hi = ids.shape[0]
        key = self._buckets(hi, kv_len)
        entry = self.graphs.get(key)
        if entry is None:
            b, kv = key
            s_ids = torch.zeros(b, 1, dtype=torch.long, device=ids.device)
            s_pos = torch.zeros(b, 1, dtype=torch.long, device=ids.device)
        else:
            _, s_ids, s_pos, _ = entry
        s_ids.zero_()
        s_pos.zero_()
        s_ids[:hi].copy_(ids)
        s_pos[:hi].copy_(pos)
        if entry is None:
            b, kv = key
            rows = CacheRows(self.cache, 0, b)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.stage(s_ids, position_ids=s_pos, cache=rows, kv_len=kv)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.stage(s_ids, position_ids=s_pos, cache=rows, kv_len=kv)
            self.pool = graph.pool()
            entry = self.graphs[key] = (graph, s_ids, s_pos, out)
        graph, _, _, out = entry
        graph.replay()
        return out[:hi]
