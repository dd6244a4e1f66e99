"""Rotary position embeddings (rotate-half layout, as HF), with llama3 and linear scaling."""

from __future__ import annotations

import math

import torch

from shared.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq_k = theta^(-2k/d), k < d/2, then scaled as ``cfg.rope_scaling`` says. (d/2,) fp32."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: keep high frequencies, divide low ones by the factor, interpolate in between.
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, S) -> cos, sin (B, S, d), computed in fp32 and cast like HF."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)  # (B, S, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, n, d); cos/sin (B, S, d) (``shared.model.ops.rope``)."""
    from shared.model.ops import rope

    return rope(x, cos, sin)
