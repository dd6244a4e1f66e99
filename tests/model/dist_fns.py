"""Functions run on every rank of the test process pool (module level, so spawn can import them)."""

from __future__ import annotations

import torch

from shared.checkpoint.layout import Layout, hf_to_shards
from shared.config import ModelConfig
from shared.model import load_stage
from shared.parallel.pipeline import pipeline_forward, pipeline_forward_backward


def _stage(ctx, cfg_dict, hf_state):
    cfg = ModelConfig.from_dict(cfg_dict)
    layout = Layout(ctx.dims.tp, ctx.dims.pp)
    shard = hf_to_shards(hf_state, cfg, layout, ranks=[(ctx.tp_rank, ctx.pp_rank)])[(ctx.tp_rank, ctx.pp_rank)]
    return cfg, load_stage(cfg, ctx, shard)


def forward_logits(ctx, cfg_dict, hf_state, ids):
    """Full-sequence logits on the last stage's TP rank 0."""
    _, stage = _stage(ctx, cfg_dict, hf_state)
    out = pipeline_forward(stage, ctx, ids)
    return out if ctx.is_last_stage and ctx.tp_rank == 0 else None


def incremental_logits(ctx, cfg_dict, hf_state, ids, prefix):
    """Prefill ``prefix`` tokens, then decode the rest one at a time through the KV cache."""
    _, stage = _stage(ctx, cfg_dict, hf_state)
    B, S = ids.shape
    cache = stage.new_cache(B, S + 4)
    outs = [pipeline_forward(stage, ctx, ids[:, :prefix], cache=cache)]
    for t in range(prefix, S):
        pos = torch.full((B, 1), t)
        outs.append(pipeline_forward(stage, ctx, ids[:, t:t + 1], position_ids=pos, cache=cache))
    return torch.cat(outs, dim=1) if ctx.is_last_stage and ctx.tp_rank == 0 else None


def gradients(ctx, cfg_dict, hf_state, microbatches):
    """Per-rank local gradients after a pipelined forward/backward of the mean token loss."""
    _, stage = _stage(ctx, cfg_dict, hf_state)
    stage.train()
    for p in stage.parameters():
        p.requires_grad_(True)
    loss = pipeline_forward_backward(stage, ctx, microbatches)
    return {"loss": loss, "tp": ctx.tp_rank, "pp": ctx.pp_rank,
            "grads": {k: p.grad.clone() for k, p in stage.named_parameters()}}


def smollm2_logits(ctx, hf_dir, ids):
    """Each rank reads only its own shard of the real SmolLM2 from disk."""
    from safetensors import safe_open

    from shared.checkpoint.layout import param_specs, shard
    import json, pathlib

    cfg = ModelConfig.from_hf(json.loads((pathlib.Path(hf_dir) / "config.json").read_text()))
    layout = Layout(ctx.dims.tp, ctx.dims.pp)
    state = {}
    with safe_open(str(pathlib.Path(hf_dir) / "model.safetensors"), "pt") as f:
        for spec in param_specs(cfg, layout):
            if spec.pp_rank(cfg, layout) != ctx.pp_rank:
                continue
            pieces = shard(spec, [f.get_tensor(n) for n in spec.hf_names], cfg, layout)
            state[spec.local_name(cfg, layout)] = pieces[ctx.tp_rank]
    stage = load_stage(cfg, ctx, state)
    out = pipeline_forward(stage, ctx, ids)
    return out if ctx.is_last_stage and ctx.tp_rank == 0 else None


def fail_on_rank_one(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on rank one")
    return ctx.rank


def coords(ctx):
    return (ctx.rank, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.prev_rank, ctx.next_rank)


def all_reduce_tp(ctx):
    import torch.distributed as dist

    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=ctx.tp_group)
    return float(t)


def die_on_rank_one(ctx):
    import os

    if ctx.rank == 1:
        os._exit(3)
    import torch.distributed as dist

    dist.barrier(group=ctx.tp_group)  # rank 0 now waits on a peer that is gone
