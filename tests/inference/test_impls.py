"""Implementation plans applied to a built stage: products above the crossover use torch's GEMM
with the packed kernels' results, and the stage keeps its state_dict keys."""

from __future__ import annotations

import pytest
import torch

from shared import kernels
from shared.inference import impls
from shared.inference.impls import ImplPlan
from tests.inference.test_kernels import _stage


def test_prefill_above_the_crossover_runs_torch_gemm_with_the_same_logits(monkeypatch):
    cfg, stage = _stage("qkv_bias")
    ids = torch.arange(3, 3 + 40).unsqueeze(0) % cfg.vocab_size
    with torch.no_grad():
        ref = stage(ids)
    keys = set(stage.state_dict())
    ImplPlan(("packed", "native-decode"), gemm_from_rows=16, logits_gemm_from_rows=16).apply(stage)
    assert set(stage.state_dict()) == keys
    assert isinstance(stage, impls.NativeDecodeStage)
    gemm, packed = [], []
    real_unpack, real_packed = impls.Packing.unpacked_t, kernels.packed_linear
    monkeypatch.setattr(impls.Packing, "unpacked_t", lambda self, p: gemm.append(1) or real_unpack(self, p))
    monkeypatch.setattr(kernels, "packed_linear", lambda *a: packed.append(1) or real_packed(*a))
    with torch.no_grad():
        got = stage(ids)
        assert len(gemm) == 4 * cfg.num_layers + 1 and not packed  # every layer's matrices and the logits
        short = stage(ids[:, :8])
    assert packed and torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(short, ref[:, :8], atol=1e-4, rtol=1e-4)


def test_plans_name_known_implementations_in_order():
    with pytest.raises(ValueError, match="unknown"):
        ImplPlan(("triton",))
    with pytest.raises(ValueError, match="packed"):
        ImplPlan(("native-decode",))
    assert ImplPlan.choose("cuda", torch.bfloat16, compiled=True).impls == ("compiled",)
    assert ImplPlan.choose("cpu", torch.bfloat16, compiled=False).weight_layout == "column-major"
