"""Mixed precision: gradients of bf16 weights accumulate across micro-batches in fp32 (``main_grad``)."""

from __future__ import annotations

import torch
from torch import nn

from shared.specs.train import TrainConfig
from shared.training.optim import MasterAdamW


def _opt(params):
    cfg = TrainConfig(load="x", save="y", data_path=("d",), train_iters=1, bf16=True, lr=0.1)
    return MasterAdamW(params, cfg)


def test_micro_batch_gradients_sum_in_fp32_not_bf16():
    w = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = _opt([("w", w)])
    for scale in (1.0, 2.0 ** -9):  # 1 + 2^-9 is not representable in bf16: a bf16 sum would drop it
        (w * scale).sum().backward()
        assert w.grad is None  # moved into the fp32 buffer at once
    opt.grads_to_masters()
    g = opt.master_grad(w)
    assert g.dtype == torch.float32 and torch.equal(g, torch.full((8,), 1.0 + 2.0 ** -9))
    opt.step(0.1)
    assert w.dtype == torch.bfloat16 and float(w[0].detach()) < 1.0
    opt.zero_grad()
    assert float(w.main_grad.abs().sum()) == 0.0


def test_fp32_parameters_keep_their_own_gradients():
    w = nn.Parameter(torch.ones(4))
    opt = _opt([("w", w)])
    (w * 3).sum().backward()
    opt.grads_to_masters()
    assert opt.master_grad(w) is w.grad and torch.equal(w.grad, torch.full((4,), 3.0))
    assert not hasattr(w, "main_grad")
