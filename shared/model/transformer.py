"""One pipeline stage of a Llama-family decoder, tensor-parallel over ``ctx.tp_group``.

``state_dict()`` keys are the megatron-core names with local layer numbers, exactly the
per-rank tensors of shared/checkpoint/layout.py. ``run_layers`` and ``logits`` are the hooks
an implementation applied by the inference engine overrides (``shared.inference.impls``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared.config import ModelConfig
from shared.model.kv_cache import KVCache
from shared.model.layers import RMSNorm, TransformerLayer, cache_mask
from shared.model.ops import EAGER
from shared.model.rope import cos_sin, inv_frequencies
from shared.parallel.layers import (VocabParallelEmbedding, gather_logits, vocab_parallel_cross_entropy,
                                    vocab_parallel_logits)
from shared.parallel.state import ParallelContext


class _Embedding(nn.Module):
    def __init__(self, padded_vocab, hidden, group, dtype, device):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, hidden, group, dtype, device)


class _Decoder(nn.Module):
    def __init__(self, cfg, n_layers, tp, group, dtype, device, with_final_norm):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, tp, group, dtype, device) for _ in range(n_layers))
        if with_final_norm:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class LlamaStage(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None, dtype: torch.dtype = torch.float32,
                 vocab_divisible_by: int = 128, recompute: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        ctx.dims.check_model(cfg)
        self.cfg, self.ctx, self.recompute = cfg, ctx, recompute
        device = device if device is not None else ctx.device
        tp, group = ctx.tp, ctx.tp_group
        self.padded_vocab = cfg.padded_vocab_size(tp, vocab_divisible_by)
        self.layer_range = ctx.dims.stage_layers(cfg.num_layers, ctx.pp_rank)
        if ctx.is_first_stage:
            self.embedding = _Embedding(self.padded_vocab, cfg.hidden_size, group, dtype, device)
        self.decoder = _Decoder(cfg, len(self.layer_range), tp, group, dtype, device,
                                with_final_norm=ctx.is_last_stage)
        if ctx.is_last_stage and (not cfg.tie_word_embeddings or ctx.dims.pp > 1):
            self.output_layer = nn.Module()
            self.output_layer.weight = nn.Parameter(
                torch.empty(self.padded_vocab // tp, cfg.hidden_size, dtype=dtype, device=device))
        self.register_buffer("inv_freq", inv_frequencies(cfg).to(device), persistent=False)
        self.ops = EAGER  # the layers' elementwise functions (``shared.model.ops``): eager or compiled

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.final_layernorm.weight.dtype if self.ctx.is_last_stage else \
            self.decoder.layers[0].input_layernorm.weight.dtype

    def output_weight(self) -> torch.Tensor:
        if hasattr(self, "output_layer"):
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight  # tied, single stage

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        return KVCache(len(self.layer_range), batch, max_seq, self.cfg.num_kv_heads // self.ctx.tp,
                       self.cfg.head_dim, self.dtype, self.inv_freq.device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                kv_len: int | None = None, cache_rows: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, gather: bool = True,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Input ids (B, S) on the first stage, hidden (B, S, h) elsewhere.

        Returns hidden (B, S, h) on inner stages; on the last stage per-token loss (B, S) when
        ``labels`` are given, else logits (B, S, V) gathered over TP (``gather=False``: this
        rank's vocab slice, padding at -inf); ``logits_at`` (B,) column indices: logits
        (B, 1, V) of those positions only. With a cache, tokens are written at slots
        ``position_ids`` and attend to slots < ``kv_len`` (default: max position + 1).
        """
        B, S = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(S, device=x.device).unsqueeze(0).expand(B, S)
        if cache is not None and kv_len is None:
            kv_len = int(position_ids.max()) + 1
        h = self.embedding.word_embeddings(x) if self.ctx.is_first_stage else x
        cos, sin = cos_sin(self.inv_freq, position_ids, h.dtype)
        h = self.run_layers(h, cos, sin, position_ids, cache, kv_len, cache_rows)
        if logits_at is not None and self.ctx.is_last_stage:
            h = h[torch.arange(B, device=h.device), logits_at].unsqueeze(1)
        return self._finish(h, labels, gather)

    def run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                   cache: KVCache | None, kv_len: int | None, cache_rows: torch.Tensor | None) -> torch.Tensor:
        """Hidden (B, S, h) through every decoder layer of this stage (a hook: see the module doc)."""
        mask = cache_mask(position_ids, kv_len, h.dtype) if cache is not None else None  # shared by all layers
        for i, layer in enumerate(self.decoder.layers):
            if self.recompute and self.training:
                h = checkpoint(layer, h, cos, sin, i, position_ids, cache, kv_len, cache_rows, mask, self.ops,
                               use_reentrant=False)
            else:
                h = layer(h, cos, sin, i, position_ids, cache, kv_len, cache_rows, mask, self.ops)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's logit columns of the final hidden state, padded vocab ids at -inf (a hook)."""
        return vocab_parallel_logits(h, self.output_weight(), self.cfg.vocab_size, self.ctx.tp_group)

    def _finish(self, h: torch.Tensor, labels: torch.Tensor | None, gather: bool) -> torch.Tensor:
        if not self.ctx.is_last_stage:
            return h
        norm = self.decoder.final_layernorm
        local = self.logits(self.ops.rms_norm(h, norm.weight, norm.eps))
        if labels is not None:
            return vocab_parallel_cross_entropy(local, labels, self.ctx.tp_group)
        return gather_logits(local, self.cfg.vocab_size, self.ctx.tp_group) if gather else local
