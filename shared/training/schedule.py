"""The 1F1B pipeline schedule (PipeDream-flush, as Megatron's non-interleaved schedule).

Stage p runs ``min(P - p - 1, M)`` warmup forwards, then alternates one forward and one
backward, then drains the remaining backwards: at most ``P - p`` microbatches' activations are
alive at once (GPipe keeps all M). In the steady state a stage sends its output and receives
that output's gradient from the next stage as one batch, then sends its input gradient and
receives the next input from the previous stage as one batch (Megatron's
``send_forward_recv_backward`` / ``send_backward_recv_forward``): the neighbour posts the
mirror-image batch, which is what NCCL needs (``shared.parallel.p2p``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from shared.parallel.p2p import exchange
from shared.parallel.state import ParallelContext


def _exchange(ctx: ParallelContext, sends: Sequence[tuple[torch.Tensor, int]],
              recvs: Sequence[tuple[tuple, torch.dtype, int]]) -> list[torch.Tensor]:
    bufs = [(torch.empty(shape, dtype=dtype, device=ctx.device), peer) for shape, dtype, peer in recvs]
    return exchange(sends, bufs)


def one_f_one_b(stage: nn.Module, ctx: ParallelContext, microbatches: Sequence[dict],
                loss_fn: Callable[[torch.Tensor, dict], torch.Tensor], hidden: int, dtype: torch.dtype) -> float:
    """Forward and backward every microbatch (``{"ids", "labels", ...}``); gradients accumulate.

    ``loss_fn(per_token_loss, microbatch)`` gives the scalar to backpropagate on the last stage.
    Returns the sum of those scalars on the last stage, 0.0 elsewhere.
    """
    M = len(microbatches)
    first, last = ctx.is_first_stage, ctx.is_last_stage
    warmup = min(ctx.dims.pp - ctx.pp_rank - 1, M)
    act_shape = lambda mb: (*mb["ids"].shape, hidden)  # noqa: E731
    pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    total = 0.0

    def forward(k: int, x: torch.Tensor | None) -> torch.Tensor:
        nonlocal total
        mb = microbatches[k]
        if first:
            x = mb["ids"]
        out = stage(x, labels=mb["labels"] if last else None)
        if last:
            out = loss_fn(out, mb)
            total += float(out.detach())
        pending.append((None if first else x, out))
        return out

    def backward(grad: torch.Tensor | None) -> torch.Tensor | None:
        x, out = pending.pop(0)
        torch.autograd.backward(out, grad_tensors=None if last else grad)
        return None if first else x.grad

    def recv_input(k: int) -> torch.Tensor | None:
        if first:
            return None
        x = _exchange(ctx, [], [(act_shape(microbatches[k]), dtype, ctx.prev_rank)])[0]
        return x.requires_grad_(True)

    for k in range(warmup):
        out = forward(k, recv_input(k))
        if not last:
            _exchange(ctx, [(out.detach(), ctx.next_rank)], [])
    x = recv_input(warmup) if warmup < M else None
    for k in range(warmup, M):
        out = forward(k, x)
        grad = None
        if not last:
            grad = _exchange(ctx, [(out.detach(), ctx.next_rank)], [(out.shape, out.dtype, ctx.next_rank)])[0]
        gin = backward(grad)
        nxt = k + 1
        if nxt < M and not first:
            x = _exchange(ctx, [(gin, ctx.prev_rank)], [(act_shape(microbatches[nxt]), dtype, ctx.prev_rank)])[0]
            x.requires_grad_(True)
        elif not first:
            _exchange(ctx, [(gin, ctx.prev_rank)], [])
    for _ in range(warmup):
        grad = None if last else _exchange(ctx, [], [(pending[0][1].shape, pending[0][1].dtype, ctx.next_rank)])[0]
        gin = backward(grad)
        if not first:
            _exchange(ctx, [(gin, ctx.prev_rank)], [])
    return total
