"""Pipeline parallelism: activations passed point-to-point between consecutive stages.

Every transfer is a batch of ``shared.parallel.p2p`` (NCCL-safe); in these schedules each
stage only receives from one side and sends to the other at a time, so no two neighbours
ever send to each other at once.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.distributed as dist

from shared.config import ModelConfig
from shared.parallel.p2p import recv, send
from shared.parallel.state import ParallelContext


class Stage(Protocol):
    """One pipeline stage as the schedules see it (``shared.model.LlamaStage`` is one)."""

    cfg: ModelConfig  # ``hidden_size`` sizes the activations passed between stages

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, x: torch.Tensor, **kw) -> torch.Tensor: ...


def stage_forward(stage: Stage, ctx: ParallelContext, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    """Receive the previous stage's activations (if any), run this stage, send them on.

    Every rank gets the same ``input_ids`` (B, S); returns this stage's output, which on the
    last stage is logits (or per-token loss with ``labels=``). Returns (stage input, output).
    """
    if ctx.is_first_stage:
        x = input_ids
    else:
        B, S = input_ids.shape
        x = recv((B, S, stage.cfg.hidden_size), stage.dtype, ctx.prev_rank, ctx.device)
        x.requires_grad_(torch.is_grad_enabled())
    out = stage(x, **kw)
    if not ctx.is_last_stage:
        send(out.detach(), ctx.next_rank)
    return x, out


@torch.no_grad()
def pipeline_forward(stage: Stage, ctx: ParallelContext, input_ids: torch.Tensor, **kw) -> torch.Tensor | None:
    """Inference forward through all stages; the output on the last stage, None elsewhere."""
    _, out = stage_forward(stage, ctx, input_ids, **kw)
    return out if ctx.is_last_stage else None


def broadcast_from_last_stage(t: torch.Tensor | None, ctx: ParallelContext, shape, dtype) -> torch.Tensor:
    """Give every rank the last stage's tensor (e.g. sampled tokens)."""
    if ctx.dims.pp == 1:
        return t
    if not ctx.is_last_stage:
        t = torch.empty(shape, dtype=dtype, device=ctx.device)
    dist.broadcast(t, src=ctx.last_stage_rank, group=ctx.pp_group)
    return t


def pipeline_forward_backward(stage: Stage, ctx: ParallelContext, microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                              loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
    """GPipe schedule: all forwards, then all backwards in reverse; gradients accumulate.

    ``microbatches`` is a list of (input_ids, labels); the loss of a microbatch is
    ``loss_fn(per_token_loss)`` (default: mean). Returns the summed loss on the last stage.
    """
    loss_fn = loss_fn or (lambda per_token: per_token.mean())
    saved, total = [], 0.0
    for ids, labels in microbatches:
        x, out = stage_forward(stage, ctx, ids, labels=labels if ctx.is_last_stage else None)
        if ctx.is_last_stage:
            out = loss_fn(out)
            total += float(out.detach())
        saved.append((x, out))
    for x, out in reversed(saved):
        if ctx.is_last_stage:
            out.backward()
        else:
            grad = recv(out.shape, out.dtype, ctx.next_rank, ctx.device)
            out.backward(grad)
        if not ctx.is_first_stage:
            send(x.grad, ctx.prev_rank)
    return total if ctx.is_last_stage else None
