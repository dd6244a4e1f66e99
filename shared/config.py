"""The architecture of a Llama-family decoder, as one frozen, typed description.

Built from an HF ``config.json`` (LlamaForCausalLM, MistralForCausalLM and Llama-like
configs) and round-tripped through JSON. Anything the model code does not implement
exactly is refused with an error that says what is unsupported, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class UnsupportedModelError(ValueError):
    """The source describes an architecture this project does not implement."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind`` is ``llama3`` (Llama-3.1) or ``linear``."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear"):
            raise UnsupportedModelError(
                f"rope_scaling type {self.kind!r} is not supported; supported: 'llama3', 'linear' "
                "(or none). Converting with another type would silently change the model."
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None) -> "RopeScaling | None":
        if not raw:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind in (None, "default"):
            if raw.get("factor") not in (None, 1, 1.0):
                raise UnsupportedModelError(f"rope_scaling without a type but with factor {raw['factor']}")
            return None
        if kind == "llama3":
            return cls(
                kind="llama3",
                factor=float(raw["factor"]),
                low_freq_factor=float(raw["low_freq_factor"]),
                high_freq_factor=float(raw["high_freq_factor"]),
                original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
            )
        if kind == "linear":
            return cls(kind="linear", factor=float(raw["factor"]))
        raise UnsupportedModelError(
            f"rope_scaling type {kind!r} is not supported; supported: 'llama3', 'linear' (or none)."
        )

    def to_hf(self) -> dict[str, Any]:
        if self.kind == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about the architecture."""

    vocab_size: int  # true vocabulary (tokenizer size incl. added tokens), before padding
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def queries_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Megatron's padding: Vp = ceil(V / (m*T)) * m*T."""
        multiple = divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.qkv_rows + self.num_heads * d * h
        if self.qkv_bias:
            attn += self.qkv_rows
        per_layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return per_layer * self.num_layers + emb + h

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        if raw.get("rope_scaling") is not None:
            raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
        raw["eos_token_ids"] = tuple(raw.get("eos_token_ids") or ())
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    # ---- HF -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], vocab_size: int | None = None) -> "ModelConfig":
        """Parse an HF config.json dict; ``vocab_size`` overrides the config's (true vocab)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = ",".join(hf.get("architectures") or [])
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({arch or 'unknown architecture'}) is not a supported "
                f"Llama-like decoder; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for moe_key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
            if hf.get(moe_key):
                raise UnsupportedModelError(
                    f"config.json has {moe_key}={hf[moe_key]}: mixture-of-experts models are not supported"
                )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; Llama-like models use 'silu'")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported (no Llama-family checkpoint uses it)")
        if model_type != "qwen2" and hf.get("attention_bias"):
            raise UnsupportedModelError(
                "attention_bias=true gives every attention projection a bias, including o_proj, which "
                "Megatron's layout has no place for; only q/k/v biases (Qwen2-style) are supported")
        max_pos = int(hf.get("max_position_embeddings", 4096))
        window = hf.get("sliding_window")
        window_on = hf.get("use_sliding_window", model_type != "qwen2")
        if window is not None and window_on and int(window) < max_pos:
            raise UnsupportedModelError(
                f"sliding_window={window} is smaller than max_position_embeddings={max_pos}, so "
                "sliding-window attention is in use and this project implements only full attention. "
                f"Set max_position_embeddings to at most {window} in config.json to use the model "
                "within its window."
            )
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        # transformers >= 5 writes rope_parameters (theta and scaling together); older configs
        # carry rope_theta and rope_scaling at the top level.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=int(vocab_size if vocab_size is not None else hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=RopeScaling.from_hf(scaling),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_file(cls, path: str | Path, vocab_size: int | None = None) -> "ModelConfig":
        return cls.from_hf(json.loads(Path(path).read_text()), vocab_size=vocab_size)

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """An HF config.json dict that transformers loads as the same architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "rope_parameters": {"rope_theta": self.rope_theta,
                                **(self.rope_scaling.to_hf() if self.rope_scaling else {"rope_type": "default"})},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "torch_dtype": dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
        }
        if self.model_type == "llama":
            out["attention_bias"] = False
            out["mlp_bias"] = False
        if self.model_type == "mistral":
            out["sliding_window"] = None
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        return out
