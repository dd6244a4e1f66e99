"""The seed's ``--model-size`` names, used only to cross-check the source's own config.

The architecture always comes from ``config.json`` / ``params.json``; a preset that disagrees
with it is an error (it usually means the wrong directory or the wrong preset).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import ModelConfig


class PresetError(ValueError):
    """A --model-size that is unknown or disagrees with the source checkpoint."""


@dataclass(frozen=True)
class Preset:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_sizes: tuple[int, ...]
    rope_scaling: bool = False  # Llama-3.1 ships llama3 rope scaling; Llama-3 must not


_LLAMA2_7B = Preset(32, 4096, 32, 32, 11008, (32000,))
_LLAMA2_13B = Preset(40, 5120, 40, 40, 13824, (32000,))
_LLAMA2_70B = Preset(80, 8192, 64, 8, 28672, (32000,))
_LLAMA3_8B = Preset(32, 4096, 32, 8, 14336, (128256,))
_LLAMA3_70B = Preset(80, 8192, 64, 8, 28672, (128256,))
_MISTRAL_7B = Preset(32, 4096, 32, 8, 14336, (32000, 32768))

PRESETS: dict[str, Preset] = {
    "llama2-7B": _LLAMA2_7B, "llama2-7Bf": _LLAMA2_7B,
    "llama2-13B": _LLAMA2_13B, "llama2-13Bf": _LLAMA2_13B,
    "llama2-70B": _LLAMA2_70B, "llama2-70Bf": _LLAMA2_70B,
    "llama3-8B": _LLAMA3_8B, "llama3-8Bf": _LLAMA3_8B,
    "llama3-70B": _LLAMA3_70B, "llama3-70Bf": _LLAMA3_70B,
    "llama3.1-8B": Preset(32, 4096, 32, 8, 14336, (128256,), True),
    "llama3.1-8Bf": Preset(32, 4096, 32, 8, 14336, (128256,), True),
    "llama3.1-70B": Preset(80, 8192, 64, 8, 28672, (128256,), True),
    "llama3.1-70Bf": Preset(80, 8192, 64, 8, 28672, (128256,), True),
    "mistral-7B": _MISTRAL_7B, "mistral-7Bf": _MISTRAL_7B,
    "yi-34B": Preset(60, 7168, 56, 8, 20480, (64000,)),
}


def check_preset(name: str, cfg: ModelConfig) -> None:
    """Raise PresetError listing every field where ``cfg`` disagrees with preset ``name``."""
    if name not in PRESETS:
        raise PresetError(f"unknown --model-size {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    diffs = [f"{field} is {getattr(cfg, field)}, {name} has {getattr(p, field)}"
             for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
             if getattr(cfg, field) != getattr(p, field)]
    if cfg.vocab_size not in p.vocab_sizes:
        diffs.append(f"vocab_size is {cfg.vocab_size}, {name} has {' or '.join(map(str, p.vocab_sizes))}")
    has_scaling = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"
    if has_scaling != p.rope_scaling:
        diffs.append(f"llama3 rope scaling is {'present' if has_scaling else 'absent'}, "
                     f"{name} {'needs' if p.rope_scaling else 'has none'}")
    if diffs:
        raise PresetError(f"--model-size {name} disagrees with the source checkpoint: {'; '.join(diffs)}. "
                          "The architecture is read from the checkpoint; fix or drop --model-size")
