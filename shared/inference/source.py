"""Where the engine's weights come from: a native checkpoint or an HF directory.

A ``ModelSource`` is small and picklable: the controller describes the checkpoint once and
every rank reads only its own (tp, pp) shard, resharded on load when the requested layout
differs from the stored one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.checkpoint.layout import Layout
from shared.config import ModelConfig


class SourceError(ValueError):
    """The checkpoint cannot be served; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    path: str
    kind: str  # "native" | "hf" | "random" (path = an HF config.json; random weights, for benchmarks)
    seed: int = 0

    @classmethod
    def open(cls, path: str | Path) -> "ModelSource":
        from shared.checkpoint.native import declared_format

        p = Path(path)
        declared = declared_format(p)
        if declared is not None:
            return cls(str(p), declared)
        if (p / "config.json").exists():
            return cls(str(p), "hf")
        if not p.exists():
            raise SourceError(f"checkpoint {p} does not exist")
        raise SourceError(f"{p} is neither a converted checkpoint (manifest.json) nor an HF model "
                          "directory (config.json); pass the directory that holds one of them")

    # ---- facts the controller needs ---------------------------------------------------------
    def config(self) -> ModelConfig:
        if self.kind == "random":
            return ModelConfig.from_hf_file(self.path)
        if self.kind == "native":
            from shared.checkpoint.native import load_manifest

            return load_manifest(self.path).config
        return ModelConfig.from_hf_file(Path(self.path) / "config.json")

    def stored_layout(self) -> Layout:
        if self.kind == "native":
            from shared.checkpoint.native import load_manifest

            return load_manifest(self.path).layout
        return Layout(1, 1)

    def stored_dtype(self) -> torch.dtype:
        if self.kind == "random":
            return torch.bfloat16
        if self.kind == "native":
            from shared.checkpoint.native import load_manifest

            return load_manifest(self.path).dtype
        from shared.checkpoint.hf import source_dtype
        from shared.checkpoint.safe_io import open_hf_weights

        return source_dtype({}, open_hf_weights(Path(self.path)))

    def generation_config(self) -> dict[str, Any]:
        if self.kind == "random":
            return {}
        if self.kind == "native":
            raw = json.loads((Path(self.path) / "manifest.json").read_text())
            return dict(raw.get("generation_config") or {})
        gc = Path(self.path) / "generation_config.json"
        return json.loads(gc.read_text()) if gc.exists() else {}

    def eos_ids(self, tokenizer=None) -> tuple[int, ...]:
        """Every EOS id of generation_config.json, else the model config's, else the tokenizer's."""
        eos = self.generation_config().get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
        cfg = self.config()
        if cfg.eos_token_ids:
            return cfg.eos_token_ids
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            return (int(tokenizer.eos_token_id),)
        return ()

    def tokenizer(self):
        from shared.tokenizer import load_tokenizer

        if self.kind == "random":
            return None

        return load_tokenizer(self.path)

    def name(self) -> str:
        return Path(self.path).resolve().name

    # ---- what one rank loads ----------------------------------------------------------------
    def local_state(self, layout: Layout, tp_rank: int, pp_rank: int,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        if self.kind == "random":
            return self._random_state(layout, tp_rank, pp_rank, dtype or torch.bfloat16)
        if self.kind == "native":
            from shared.checkpoint.native import load_rank_state_dict

            return load_rank_state_dict(self.path, tp_rank, pp_rank, target=layout, dtype=dtype)
        from shared.checkpoint.layout import param_specs, shard
        from shared.checkpoint.safe_io import open_hf_weights

        cfg = self.config()
        src = open_hf_weights(Path(self.path))
        out = {}
        try:
            for spec in param_specs(cfg, layout):
                if spec.pp_rank(cfg, layout) != pp_rank:
                    continue
                hf = [src.get(n) for n in spec.hf_names]
                if spec.kind == "vocab":
                    hf = [t[: cfg.vocab_size] for t in hf]
                piece = shard(spec, hf, cfg, layout)[tp_rank]
                out[spec.local_name(cfg, layout)] = piece.to(dtype) if dtype is not None else piece.clone()
        finally:
            src.close()
        return out

    def _random_state(self, layout: Layout, tp_rank: int, pp_rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Random weights of the right shapes, made on this rank's GPU when there is one (fast for 8B)."""
        from shared.model import random_state

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return random_state(self.config(), layout, tp_rank, pp_rank, dtype, device, self.seed)
