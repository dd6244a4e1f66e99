"""Rank functions of the point-to-point tests (module level, so spawned workers can import them)."""

from __future__ import annotations

import torch

from shared.parallel.p2p import exchange
from tests.model.dist_fns import _stage


def swap_paired(ctx):
    """Ranks 0 and 1 swap a tensor: the send and the receive posted as one batch."""
    peer = 1 - ctx.rank
    got = exchange([(torch.full((4,), float(ctx.rank)), peer)], [(torch.empty(4), peer)])[0]
    return float(got[0])


def swap_send_first(ctx):
    """The order 1F1B used to have: each operation posted on its own, both ranks sending first."""
    peer = 1 - ctx.rank
    exchange([(torch.full((4,), float(ctx.rank)), peer)], [])
    return float(exchange([], [(torch.empty(4), peer)])[0][0])


def one_f_one_b_grads(ctx, cfg_dict, hf_state, microbatches):
    """Loss and local gradients of a 1F1B step over ``microbatches`` (summed mean token losses)."""
    from shared.training.schedule import one_f_one_b

    cfg, stage = _stage(ctx, cfg_dict, hf_state)
    stage.train()
    for p in stage.parameters():
        p.requires_grad_(True)
    mbs = [{"ids": ids, "labels": labels} for ids, labels in microbatches]
    loss = one_f_one_b(stage, ctx, mbs, lambda per_token, mb: per_token.mean(), cfg.hidden_size, stage.dtype)
    return {"loss": loss if ctx.is_last_stage else None, "tp": ctx.tp_rank, "pp": ctx.pp_rank,
            "grads": {k: p.grad.clone() for k, p in stage.named_parameters()}}
