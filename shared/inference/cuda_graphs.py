"""Decode steps replayed as CUDA graphs, captured at load for every bucket (any pipeline stage).

Buckets: batch sizes 1, 2, 4, ... up to the cache's rows, and kv lengths 256, 512, ... up to
the cache's length; a step over rows 0..hi-1 at kv length L replays the smallest bucket that
holds both (slots beyond a row's position are masked; rows beyond hi are dummy rows, token 0
at position 0 of rows no sequence is decoding in, which nobody reads). The graphs read the
worker's device buffers — token ids on the first stage, the received hidden state on the
others, and the positions — so a step copies nothing in; the transfers between pipeline
stages stay outside the graphs, the tensor-parallel collectives inside them.

Every bucket is captured when the model loads, never while requests wait. Capture runs under
one process-wide lock and in thread-local capture mode, so other engines of the same process
(their own threads) may allocate, synchronize and launch meanwhile without breaking it, and
no two engines capture at once. Capturing writes slot 0 of the cache's rows, which hold no
sequence yet. An engine's graphs share one memory pool; each replay's output is consumed
before the next replay.
"""

from __future__ import annotations

import threading

import torch

from shared.model import LlamaStage
from shared.model.kv_cache import CacheRows, KVCache

CAPTURE_LOCK = threading.Lock()
KV_FIRST = 256


def batch_buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def kv_buckets(max_seq: int, first: int = KV_FIRST) -> list[int]:
    out, kv = [], first
    while kv < max_seq:
        out.append(kv)
        kv *= 2
    return out + [max_seq]


def bucket_for(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


class StageGraphs:
    """This rank's decode step for every (batch, kv length) bucket.

    ``inputs``: the static input buffer, (max_batch, 1) token ids on the first stage, else
    (max_batch, 1, hidden); ``positions``: (max_batch, 1).
    """

    def __init__(self, stage: LlamaStage, cache: KVCache, inputs: torch.Tensor, positions: torch.Tensor):
        self.stage, self.cache, self.inputs, self.positions = stage, cache, inputs, positions
        self.batches = batch_buckets(cache.batch)
        self.kvs = kv_buckets(cache.max_seq)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def key(self, hi: int, kv_len: int) -> tuple[int, int]:
        return bucket_for(hi, self.batches), bucket_for(kv_len, self.kvs)

    def _step(self, b: int, kv: int) -> torch.Tensor:
        return self.stage(self.inputs[:b], position_ids=self.positions[:b], cache=CacheRows(self.cache, 0, b),
                          kv_len=kv)

    @torch.no_grad()
    def capture(self) -> int:
        """Warm up and capture every bucket; returns how many graphs there are."""
        device = self.inputs.device
        with CAPTURE_LOCK, torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compiles the fused ops and initializes cuBLAS for each shape
                for b in self.batches:
                    for kv in self.kvs:
                        self._step(b, kv)
            torch.cuda.current_stream(device).wait_stream(side)
            for b in self.batches:
                for kv in self.kvs:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                        out = self._step(b, kv)
                    self.pool = graph.pool()
                    self.graphs[(b, kv)] = (graph, out)
            torch.cuda.synchronize(device)
        return len(self.graphs)

    def run(self, hi: int, kv_len: int) -> torch.Tensor:
        """Replay the bucket of (hi, kv_len); the output of all its rows (bucket, 1, ...)."""
        graph, out = self.graphs[self.key(hi, kv_len)]
        graph.replay()
        return out
