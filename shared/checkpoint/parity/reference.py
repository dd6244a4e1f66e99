"""The reference side: transformers' own modules for the source architecture, one layer at a time.

The classes come from the model transformers builds for ``cfg.model_type`` (made on the meta
device, so nothing is allocated): its decoder layer, final norm, rotary embedding, embedding
and output-layer classes, and its causal-mask function. One decoder layer is materialised and
refilled from the source tensors for every layer; embedding and output layer are applied in
row blocks. Weights are rounded to the checkpoint's dtype, then computed in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelConfig
from shared.checkpoint import layout as param_layout
from shared.checkpoint.parity.plan import evict, resident
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import TensorSource

EMBED, HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


def _layer_names(cfg: ModelConfig, i: int) -> list[str]:
    return [n for spec in param_layout.layer_specs(cfg, i) for n in spec.hf_names]


def _skeleton(cfg: ModelConfig, compute: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_hf("float32").items() if k != "architectures"})
    with torch.device("meta"), no_init_weights():
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=compute)


class Reference:
    """``embed`` -> ``layer`` for every layer -> ``head``, on HF's modules."""

    def __init__(self, cfg: ModelConfig, source: TensorSource, weights: torch.dtype, compute: torch.dtype,
                 block_rows: int) -> None:
        from transformers.masking_utils import create_causal_mask

        self.cfg, self.source, self.weights, self.compute = cfg, source, weights, compute
        skeleton = _skeleton(cfg, compute)
        self.config, model = skeleton.config, skeleton.model
        self.decoder_layer = model.layers[0].eval()  # on the meta device until a pass reaches the layers
        self.norm = model.norm.to_empty(device="cpu").eval()
        self.rotary = type(model.rotary_emb)(config=self.config)
        self._embedding_cls, self._head_cls = type(model.embed_tokens), type(skeleton.lm_head)
        self._causal_mask = create_causal_mask
        self._check_names()
        self._block = torch.empty(block_rows, cfg.hidden_size, dtype=compute)
        self._attn: dict[str, torch.Tensor] = {}
        self.decoder_layer.self_attn.register_forward_hook(lambda m, args, out: self._attn.update(out=out[0]))
        self._pos = self._mask = self._rope = self._cache = None

    def _check_names(self) -> None:
        want = {n.removeprefix("model.layers.0.") for n in _layer_names(self.cfg, 0)}
        have = {n for n, _ in self.decoder_layer.named_parameters()}
        if want != have:
            raise CheckpointError(f"parity: transformers' {type(self.decoder_layer).__name__} has parameters "
                                  f"{sorted(have ^ want)} that the weights do not match")

    def _read(self, name: str) -> torch.Tensor:
        return self.source.get(name).to(self.weights)

    def _rows(self, name: str, lo: int, n: int) -> torch.Tensor:
        """Rows [lo, lo + n) of a vocab tensor, in the reusable block buffer."""
        block = self._block[:n]
        block.copy_(self.source.rows(name, lo, lo + n).to(self.weights))
        self.source.release()
        return block

    def _blocks(self):
        rows, v = self._block.shape[0], self.cfg.vocab_size
        return ((lo, min(rows, v - lo)) for lo in range(0, v, rows))

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, start: int = 0, capacity: int = 0) -> torch.Tensor:
        """The embeddings of ``ids`` at positions ``start``...; with ``capacity`` the pass from ``start``
        = 0 opens transformers' KV cache, which later passes continue."""
        from transformers import DynamicCache

        B, S = ids.shape
        h = torch.zeros(B, S, self.cfg.hidden_size, dtype=self.compute)
        for lo, n in self._blocks():
            local = ids - lo
            inside = (local >= 0) & (local < n)
            if inside.any():
                emb = self._embedding_cls(n, self.cfg.hidden_size, device="meta")
                emb.weight = nn.Parameter(self._rows(EMBED, lo, n), requires_grad=False)
                h[inside] = emb(local[inside])
        if start == 0:
            self._cache = DynamicCache(config=self.config) if capacity else None
        self._pos = torch.arange(start, start + S).unsqueeze(0).expand(B, S)
        self._mask = self._causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=self._cache,
                                       position_ids=self._pos)
        self._rope = self.rotary(h, self._pos)
        return h

    @torch.no_grad()
    def layer(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden after attention, hidden after the MLP) of decoder layer ``i``."""
        params = dict(resident(self.decoder_layer).named_parameters())
        for name in _layer_names(self.cfg, i):
            params[name.removeprefix(f"model.layers.{i}.")].copy_(self._read(name))
        self.source.release()
        self.source.prefetch(_layer_names(self.cfg, i + 1) if i + 1 < self.cfg.num_layers else
                             [NORM, EMBED if self.cfg.tie_word_embeddings else HEAD])
        self.decoder_layer.self_attn.layer_idx = i  # its slot in the KV cache
        out = self.decoder_layer(h, attention_mask=self._mask, position_ids=self._pos, cache=self._cache,
                                 use_cache=self._cache is not None, position_embeddings=self._rope)
        return h + self._attn.pop("out"), out

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, S, V) of the final norm and the output layer (the layer buffer freed first)."""
        evict(self.decoder_layer)
        self.norm.weight.copy_(self._read(NORM))
        x = self.norm(h)
        name = EMBED if self.cfg.tie_word_embeddings else HEAD
        logits = torch.empty(*h.shape[:2], self.cfg.vocab_size, dtype=torch.float32)
        for lo, n in self._blocks():
            lin = self._head_cls(self.cfg.hidden_size, n, bias=False, device="meta")
            lin.weight = nn.Parameter(self._rows(name, lo, n), requires_grad=False)
            logits[..., lo:lo + n] = lin(x).float()
        return logits

    def close(self) -> None:
        self.source.release()
