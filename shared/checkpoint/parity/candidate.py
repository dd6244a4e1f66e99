"""The candidate side: this project's model on the written checkpoint at its own TP and PP, a layer at a time.

Every step runs on the T ranks of one tensor-parallel group (spawned gloo processes; at T = 1
the calling process). Each rank reads only its own shard of the current layer, from the rank
file of the stage that holds the layer - the very tensor that TP rank of that stage loads - into
one ``TransformerLayer`` allocated once, and runs it with the real collectives. The stages take
their turn on the same TP group, and the hidden states passed from layer to layer are the
candidate's own. The embedding and the output layer go through in row blocks of the rank's
vocab shard, with the vocab-parallel functions the model uses: the masked lookup and its
all-reduce, the logits with the padded ids masked, gathered over TP.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.config import ModelConfig
from shared.checkpoint import layout as param_layout
from shared.checkpoint import megatron_lm, native
from shared.checkpoint.layout import Layout
from shared.checkpoint.parity.plan import evict, resident
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import open_hf_weights, SafetensorsSource
from shared.dtypes import dtype_name, parse_dtype
from shared.model.kv_cache import KVCache
from shared.model.layers import RMSNorm, TransformerLayer
from shared.model.rope import cos_sin, inv_frequencies
from shared.parallel.comm import reduce_from_tp
from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import ProcessGroupPool, process_state
from shared.parallel.layers import gather_logits, linear, mask_vocab_padding, masked_embedding
from shared.parallel.state import ParallelContext

EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"


@dataclass(frozen=True)
class Written:
    """A written checkpoint as its ranks open it: ``native``, ``megatron-lm`` or ``hf`` (an export, TP1·PP1)."""

    kind: str
    directory: str
    layout: Layout


class _NativeShards:
    """One TP rank's rank files (one per stage), each tensor a private map of its bytes."""

    def __init__(self, w: Written, cfg: ModelConfig, tp_rank: int) -> None:
        d = Path(w.directory)
        names = native.load_manifest(d).rank_names() if (d / native.MANIFEST).exists() else None
        self._paths = {p: d / (names[(tp_rank, p)] if names else native.rank_file(tp_rank, p))
                       for p in range(w.layout.pp)}
        self._files: dict[int, SafetensorsSource] = {}

    def _file(self, stage: int) -> SafetensorsSource:
        if stage not in self._files:
            self._files[stage] = SafetensorsSource([self._paths[stage]], zero_copy=True)
        return self._files[stage]

    def has(self, stage: int, name: str) -> bool:
        return name in self._file(stage)

    def get(self, stage: int, name: str) -> torch.Tensor:
        return self._file(stage).get(name)

    def rows(self, stage: int, name: str, lo: int, n: int) -> torch.Tensor:
        return self.get(stage, name)[lo:lo + n]

    def prefetch(self, stage: int, names: list[str]) -> None:
        self._file(stage).prefetch(names)

    def release(self) -> None:
        pass


class _MegatronShards(_NativeShards):
    """One TP rank's ``model_optim_rng.pt`` files, loaded (memory-mapped) per step and dropped after."""

    def __init__(self, w: Written, cfg: ModelConfig, tp_rank: int) -> None:
        self._w, self._tp_rank = w, tp_rank
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}

    def _stage(self, stage: int) -> dict[str, torch.Tensor]:
        if stage not in self._loaded:
            state = megatron_lm.load_rank(self._w.directory, self._tp_rank, stage, self._w.layout.pp)
            self._loaded[stage] = megatron_lm.from_megatron_names(state["model"])
        return self._loaded[stage]

    def has(self, stage: int, name: str) -> bool:
        return name in self._stage(stage)

    def get(self, stage: int, name: str) -> torch.Tensor:
        return self._stage(stage)[name]

    def prefetch(self, stage: int, names: list[str]) -> None:
        pass

    def release(self) -> None:
        self._loaded.clear()


class _HFShards(_NativeShards):
    """An HF export read as the TP1·PP1 shards ``layout.shard`` makes of it."""

    def __init__(self, w: Written, cfg: ModelConfig, tp_rank: int) -> None:
        if (w.layout.tp, w.layout.pp) != (1, 1):
            raise CheckpointError("an HF checkpoint is read at TP1·PP1")
        self._cfg, self._layout = cfg, w.layout
        self._src = open_hf_weights(Path(w.directory), zero_copy=True)
        self._spec = {s.local_name(cfg, w.layout): s for s in param_layout.param_specs(cfg, w.layout)}

    def has(self, stage: int, name: str) -> bool:
        return name in self._spec

    def prefetch(self, stage: int, names: list[str]) -> None:
        self._src.prefetch([n for name in names for n in self._spec[name].hf_names])

    def get(self, stage: int, name: str) -> torch.Tensor:
        spec = self._spec[name]
        hf = [self._src.get(n) for n in spec.hf_names]
        return param_layout.shard(spec, [param_layout.trim_vocab(spec, t, self._cfg) for t in hf], self._cfg, self._layout)[0]

    def rows(self, stage: int, name: str, lo: int, n: int) -> torch.Tensor:
        t = self._src.get(self._spec[name].hf_names[0])[lo:min(lo + n, self._cfg.vocab_size)]
        return torch.cat([t, t.new_zeros(n - t.shape[0], t.shape[1])]) if t.shape[0] < n else t


_SHARDS = {"native": _NativeShards, "megatron-lm": _MegatronShards, "hf": _HFShards}


@dataclass(frozen=True)
class _Setup:
    token: str
    written: Written
    model: dict[str, Any]
    compute: str
    block_rows: int


class _Rank:
    """What one rank keeps between steps: its readers and the buffers every layer is copied into."""

    def __init__(self, ctx: ParallelContext, setup: _Setup) -> None:
        self.ctx, self.token = ctx, setup.token
        self.cfg = cfg = ModelConfig.from_dict(setup.model)
        self.layout, self.compute = setup.written.layout, parse_dtype(setup.compute)
        self.shards = _SHARDS[setup.written.kind](setup.written, cfg, ctx.tp_rank)
        self.layer = TransformerLayer(cfg, ctx.tp, ctx.tp_group, self.compute, "meta").eval()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.compute)
        self.block = torch.empty(setup.block_rows, cfg.hidden_size, dtype=self.compute)
        self.per_rank = self.layout.padded_vocab(cfg) // ctx.tp
        self.start = ctx.tp_rank * self.per_rank
        self.inv_freq = inv_frequencies(cfg)
        self._attn: dict[str, torch.Tensor] = {}
        self.layer.self_attention.register_forward_hook(lambda m, args, out: self._attn.update(out=out))

    def _blocks(self):
        rows = self.block.shape[0]
        return ((lo, min(rows, self.per_rank - lo)) for lo in range(0, self.per_rank, rows))

    def _rows(self, stage: int, name: str, lo: int, n: int) -> torch.Tensor:
        block = self.block[:n]
        block.copy_(self.shards.rows(stage, name, lo, n))
        self.shards.release()
        return block

    def embed(self, arg: tuple[torch.Tensor, int, int]) -> torch.Tensor:
        ids, start, capacity = arg
        B, S = ids.shape
        h = torch.zeros(B, S, self.cfg.hidden_size, dtype=self.compute)
        for lo, n in self._blocks():
            first = self.start + lo  # the vocab id of the block's first row
            if ((ids >= first) & (ids < first + n)).any():
                h += masked_embedding(ids, self._rows(0, EMBEDDING, lo, n), first, n)
        if start == 0:
            self.cache = KVCache(self.cfg.num_layers, B, capacity, self.cfg.num_kv_heads // self.ctx.tp,
                                 self.cfg.head_dim, self.compute) if capacity else None
        self.pos = torch.arange(start, start + S).unsqueeze(0).expand(B, S)
        self.cos, self.sin = cos_sin(self.inv_freq, self.pos, self.compute)
        return reduce_from_tp(h, self.ctx.tp_group)

    def _layer_names(self, i: int) -> tuple[int, list[str]]:
        """The stage holding layer ``i`` and the layer's local names in that stage's rank file."""
        specs = param_layout.layer_specs(self.cfg, i)
        return specs[0].pp_rank(self.cfg, self.layout), [s.local_name(self.cfg, self.layout) for s in specs]

    def layer_step(self, arg: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        i, h = arg
        stage, names = self._layer_names(i)
        params = dict(resident(self.layer).named_parameters())
        for local in names:
            params[local.split(".", 3)[3]].copy_(self.shards.get(stage, local))
        self.shards.release()
        if i + 1 < self.cfg.num_layers:
            self.shards.prefetch(*self._layer_names(i + 1))
        kv_len = int(self.pos[0, -1]) + 1 if self.cache is not None else None
        out = self.layer(h, self.cos, self.sin, i, self.pos, self.cache, kv_len, None)
        return h + self._attn.pop("out"), out

    def _output_layer(self) -> tuple[int, str]:
        """Where this rank's output layer is stored (a tied one in stage 0, unless a copy was kept)."""
        last = self.layout.pp - 1
        if self.shards.has(last, OUTPUT):
            return last, OUTPUT
        if self.cfg.tie_word_embeddings:
            return 0, EMBEDDING
        raise CheckpointError(f"the written checkpoint has no {OUTPUT} for TP rank {self.ctx.tp_rank}")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        evict(self.layer)
        last = self.layout.pp - 1
        self.norm.weight.copy_(self.shards.get(last, FINAL_NORM))
        x = self.norm(h)
        stage, name = self._output_layer()
        local = torch.empty(*h.shape[:2], self.per_rank, dtype=self.compute)
        for lo, n in self._blocks():
            local[..., lo:lo + n] = linear(x, self._rows(stage, name, lo, n))
        local = mask_vocab_padding(local, self.start, self.cfg.vocab_size)
        return gather_logits(local, self.cfg.vocab_size, self.ctx.tp_group).float()


@torch.no_grad()
def rank_step(ctx: ParallelContext, setup: _Setup, op: str, arg: Any) -> Any:
    """One step on one rank (``embed``, ``layer_step``, ``head`` or ``close``); TP rank 0 returns the result."""
    state = process_state()
    if op == "close":
        state.pop("parity", None)
        return None
    rank = state.get("parity")
    if rank is None or rank.token != setup.token:
        rank = state["parity"] = _Rank(ctx, setup)
    out = getattr(rank, op)(arg)
    return out if ctx.tp_rank == 0 else None


class Candidate:
    """The driver in the calling process: ``embed`` -> ``layer`` per layer -> ``head``, run on the ranks.

    ``pool``: a ``ProcessGroupPool`` (or anything with its ``run``) to use; by default one of T
    gloo ranks is started for T > 1 and the steps run in this process for T = 1."""

    def __init__(self, cfg: ModelConfig, written: Written, compute: torch.dtype, block_rows: int, pool=None) -> None:
        self.dims = ParallelDims(tp=written.layout.tp)
        self._setup = _Setup(uuid.uuid4().hex, written, cfg.to_dict(), dtype_name(compute), block_rows)
        self._owned = ProcessGroupPool(self.dims.tp, "gloo") if pool is None and self.dims.tp > 1 else None
        self._pool = pool or self._owned

    def _step(self, op: str, arg: Any) -> Any:
        if self._pool is None:
            return rank_step(ParallelContext.single(), self._setup, op, arg)
        return self._pool.run(self.dims, rank_step, self._setup, op, arg)[0]

    def embed(self, ids: torch.Tensor, start: int = 0, capacity: int = 0) -> torch.Tensor:
        """As ``Reference.embed``: with ``capacity`` the pass from 0 opens the ranks' KV caches."""
        return self._step("embed", (ids, start, capacity))

    def layer(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step("layer_step", (i, h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self._step("head", h)

    def close(self) -> None:
        try:
            if self._pool is None or not getattr(self._pool, "broken", False):
                self._step("close", None)
        finally:
            if self._owned is not None:
                self._owned.close()
