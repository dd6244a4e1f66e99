"""The fused (compiled) layer ops through a training step: loss and gradients equal eager's."""

from __future__ import annotations

import torch

from shared.model.ops import EAGER, compiled
from tests.inference.test_kernels import _stage


def _loss_and_grads(stage, ids, labels):
    stage.train()
    stage.zero_grad(set_to_none=True)
    for p in stage.parameters():
        p.requires_grad_(True)
    loss = stage(ids, labels=labels).mean()
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in stage.named_parameters()}


def test_compiled_ops_train_like_eager():
    cfg, stage = _stage("llama3")
    torch.manual_seed(4)
    ids, labels = torch.randint(0, cfg.vocab_size, (2, 24)), torch.randint(0, cfg.vocab_size, (2, 24))
    stage.ops = EAGER
    ref_loss, ref = _loss_and_grads(stage, ids, labels)
    stage.ops = compiled()
    loss, got = _loss_and_grads(stage, ids, labels)
    assert abs(loss - ref_loss) < 1e-5
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), k


def test_without_a_working_compiler_the_eager_ops_are_used(monkeypatch):
    from dataclasses import replace

    from shared.model import ops

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ops, "compiled", lambda: replace(EAGER, name="compiled", rms_norm=broken))
    assert ops.compiled_or_eager(torch.device("cpu"), torch.float32) is EAGER
