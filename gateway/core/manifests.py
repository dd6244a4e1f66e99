"""What the gateway reads from a stored checkpoint's manifest (no weights, no torch)."""

from __future__ import annotations

from shared.config import ModelConfig


def model_positions(manifest: dict) -> int | None:
    """A stored checkpoint's position limit (``max_position_embeddings``), native or HF upload."""
    model = manifest.get("model") or manifest.get("hf_config") or {}
    value = model.get("max_position_embeddings") if isinstance(model, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def model_config(manifest: dict) -> ModelConfig | None:
    """A stored checkpoint's model config (native ``model`` or an HF upload's ``hf_config``), or None
    when it cannot be read here (the job's worker then reports why)."""
    try:
        if isinstance(manifest.get("model"), dict):
            return ModelConfig.from_dict(manifest["model"])
        if isinstance(manifest.get("hf_config"), dict):
            return ModelConfig.from_hf(manifest["hf_config"])
    except (ValueError, KeyError, TypeError):
        return None
    return None
