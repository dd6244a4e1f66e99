"""Functions run on every rank of the test process pool (module level, so spawn can import them)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.checkpoint.layout import Layout
from shared.checkpoint.native import load_manifest, load_rank_state_dict
from shared.model import load_stage
from shared.parallel.pipeline import pipeline_forward
from shared.training.lora import apply_lora


def _stage(ctx, directory):
    cfg = load_manifest(directory).config
    state = load_rank_state_dict(directory, ctx.tp_rank, ctx.pp_rank, target=Layout(ctx.dims.tp, ctx.dims.pp),
                                 dtype=torch.float32)
    return cfg, load_stage(cfg, ctx, state)


def adapter_and_merged_logits(ctx, base_dir, run_dir, lora: dict, ids):
    """Logits of (base model, base + exported adapters, the merged release) on the last stage."""
    cfg, base = _stage(ctx, base_dir)
    base_logits = pipeline_forward(base, ctx, ids)
    offset = ctx.dims.stage_layers(cfg.num_layers, ctx.pp_rank).start
    apply_lora(base, tuple(lora["targets"]), lora["rank"], lora["alpha"], 0.0, lora["seed"], offset)
    adapters = load_file(str(Path(run_dir) / "lora" / f"adapter_tp{ctx.tp_rank}_pp{ctx.pp_rank}.safetensors"))
    missing, unexpected = base.load_state_dict(adapters, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    adapted = pipeline_forward(base.eval(), ctx, ids)
    _, merged = _stage(ctx, Path(run_dir) / "release")
    out = pipeline_forward(merged, ctx, ids)
    if ctx.is_last_stage and ctx.tp_rank == 0:
        return base_logits, adapted, out
    return None
