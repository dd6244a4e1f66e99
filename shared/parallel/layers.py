"""Tensor-parallel layers. Each takes its process group explicitly; none reads global state.

Weights are stored in the layout of shared/checkpoint/layout.py, so a layer's ``weight`` is
exactly the TP shard that a checkpoint holds for this rank. A layer's local arithmetic is one
plain method (``product`` of the linears, ``lookup`` of the embedding) around which the layer
does its tensor-parallel communication: another implementation overrides that method only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.parallel.comm import copy_to_tp, gather_last_dim, reduce_from_tp


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A rank's local product (``F.linear``), for code that holds weights outside the layers."""
    return F.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """y_t = x W_t^T (+ b_t): the output dim is split; the input is replicated."""

    def __init__(self, in_features: int, out_features: int, group=None, bias: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        tp = _tp_size(group)
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by TP size {tp}")
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features // tp, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(copy_to_tp(x, self.group))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's x W_t^T (+ b_t)."""
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_t x_t W_t^T: the input dim is split; partial outputs are all-reduced."""

    def __init__(self, in_features: int, out_features: int, group=None, dtype=torch.float32, device=None):
        super().__init__()
        tp = _tp_size(group)
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by TP size {tp}")
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(self.product(x), self.group)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum x_t W_t^T."""
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Rows [t*Vp/T, (t+1)*Vp/T) on rank t; ids outside the range contribute zeros."""

    def __init__(self, padded_vocab: int, hidden: int, group=None, dtype=torch.float32, device=None):
        super().__init__()
        tp = _tp_size(group)
        self.group = group
        self.per_rank = padded_vocab // tp
        self.start = _tp_rank(group) * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _tp_size(self.group) == 1:
            return self.lookup(ids)
        return reduce_from_tp(masked_lookup(ids, self.lookup, self.start, self.per_rank), self.group)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (local to this rank) of this rank's table."""
        return F.embedding(ids, self.weight)


def masked_lookup(ids: torch.Tensor, lookup, start: int, rows: int) -> torch.Tensor:
    """``lookup`` of the ids in [start, start + rows) (shifted to local rows); zeros elsewhere."""
    local = ids - start
    outside = (local < 0) | (local >= rows)
    out = lookup(local.masked_fill(outside, 0))
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def masked_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """The rows of ``weight`` (vocab ids [start, start + rows)) for ``ids`` in that range; zeros elsewhere."""
    return masked_lookup(ids, lambda local: F.embedding(local, weight), start, rows)


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, true_vocab: int, group=None,
                          product=F.linear) -> torch.Tensor:
    """This rank's logit columns [.., Vp/T] (``product(x, weight)``), padded-vocab columns at -inf."""
    logits = product(copy_to_tp(x, group), weight)
    return mask_vocab_padding(logits, _tp_rank(group) * logits.shape[-1], true_vocab)


def mask_vocab_padding(logits: torch.Tensor, start: int, true_vocab: int) -> torch.Tensor:
    """Logit columns of vocab ids [start, start + cols) with the padded ids (>= ``true_vocab``) at -inf."""
    rows = logits.shape[-1]
    if start + rows > true_vocab:
        cols = torch.arange(start, start + rows, device=logits.device)
        logits = logits.masked_fill(cols >= true_vocab, float("-inf"))
    return logits


def gather_logits(local_logits: torch.Tensor, true_vocab: int, group=None) -> torch.Tensor:
    """Full logits [.., V] (padding dropped) from each rank's vocab slice."""
    return gather_last_dim(local_logits, group)[..., :true_vocab]


class _VocabParallelCE(torch.autograd.Function):
    """Cross entropy over vocab-sharded logits without gathering them (Megatron's algorithm)."""

    @staticmethod
    def forward(ctx, logits, target, group):
        logits = logits.float()
        vmax = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - vmax.unsqueeze(-1)
        per = logits.shape[-1]
        start = _tp_rank(group) * per
        local_t = target - start
        outside = (local_t < 0) | (local_t >= per)
        local_t = local_t.masked_fill(outside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(picked, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - picked
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, outside = ctx.saved_tensors
        g = softmax
        g.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).to(g.dtype).unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss [..] from vocab-sharded logits [.., Vp/T] (pad columns already -inf)."""
    return _VocabParallelCE.apply(local_logits, target, group)
