"""The native CPU kernels against torch: packed matrix products, and whole decode steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared import kernels
from shared.config import ModelConfig
from shared.inference.impls import cpu_weight_layout
from shared.model import LlamaStage
from shared.parallel.state import ParallelContext
from tests.model.families import make_hf_model


def test_the_kernels_build_here():
    assert kernels.available(), "CI machines have a C compiler and AVX2; the engine relies on these kernels"


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13])
@pytest.mark.parametrize("n,k", [(24, 40), (64, 17), (256, 96)])  # odd and even panel counts, any K
def test_packed_linear_matches_torch(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(3, m, k, generator=g), torch.randn(n, generator=g)
    packed = kernels.pack(w)
    assert torch.equal(kernels.unpack(packed), w)
    with torch.no_grad():
        assert torch.allclose(kernels.packed_linear(x, packed), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert torch.allclose(kernels.packed_linear(x, packed, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[0, 7, n - 1], [3, 3, 8]])
    assert torch.equal(kernels.embedding(ids, packed), F.embedding(ids, w))


def _stage(family):
    hf = make_hf_model(family)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    from shared.checkpoint.layout import hf_to_shards, Layout

    state = hf_to_shards({k: v for k, v in hf.state_dict().items()}, cfg, Layout(1, 1))[(0, 0)]
    stage = LlamaStage(cfg, ParallelContext.single())
    stage.load_state_dict(state)
    return cfg, stage.eval()


def _decode_logits(stage, prompts, steps):
    """Prefill each row, then greedy decode ``steps`` tokens for all rows at once; every step's logits."""
    cache = stage.new_cache(len(prompts), 64)
    out, last, pos = [], [], []
    with torch.no_grad():
        for b, p in enumerate(prompts):
            from shared.model.kv_cache import CacheRows

            logits = stage(torch.tensor([p]), position_ids=torch.arange(len(p)).unsqueeze(0),
                           cache=CacheRows(cache, b, b + 1), kv_len=len(p))
            last.append(int(logits[0, -1].argmax()))
            pos.append(len(p))
        for _ in range(steps):
            ids, p = torch.tensor(last).unsqueeze(1), torch.tensor(pos).unsqueeze(1)
            logits = stage(ids, position_ids=p, cache=cache, kv_len=int(p.max()) + 1)[:, 0]
            out.append(logits)
            last, pos = logits.argmax(-1).tolist(), [q + 1 for q in pos]
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama3", "llama2", "qkv_bias", "tied"])
def test_native_decode_steps_match_torch(family):
    """Rows of different lengths decoding together: the one-call native step (packed weights)
    gives the torch layers' logits, and the same greedy tokens."""
    cfg, stage = _stage(family)
    prompts = [[1, 5, 9, 2, 7], [3, 4], [8, 8, 8, 1, 2, 6, 5, 4, 3]]
    ref = _decode_logits(stage, prompts, 6)
    assert cpu_weight_layout(stage) == "packed"
    calls = []
    real = kernels.StageDecoder.__call__
    kernels.StageDecoder.__call__ = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        native = _decode_logits(stage, prompts, 6)
    finally:
        kernels.StageDecoder.__call__ = real
    assert len(calls) == 6, "each decode step should be one native call"
    assert torch.allclose(native, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(native.argmax(-1), ref.argmax(-1))


def test_native_layer_step_matches_torch():
    """The per-layer native step (used when tensor parallel size > 1) on one layer."""
    cfg, stage = _stage("llama3")
    layer = stage.decoder.layers[1]
    from shared.model.rope import cos_sin

    x = torch.randn(2, 1, cfg.hidden_size)
    pos = torch.tensor([[3], [5]])
    cos, sin = cos_sin(stage.inv_freq, pos, torch.float32)
    caches = [stage.new_cache(2, 16) for _ in range(2)]
    for c in caches:  # the same earlier keys and values in both
        torch.manual_seed(0)
        c.k.normal_(), c.v.normal_()
    with torch.no_grad():
        ref = layer(x, cos, sin, 1, pos, caches[0], 6, None)
        cpu_weight_layout(stage)
        assert layer._native_decode(x)
        got = layer(x, cos, sin, 1, pos, caches[1], 6, None)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(caches[1].k, caches[0].k, atol=1e-6) and torch.allclose(caches[1].v, caches[0].v, atol=1e-6)


def test_without_the_kernels_weights_stay_torch_matrices(monkeypatch):
    cfg, stage = _stage("llama3")
    prompts = [[1, 5, 9, 2, 7], [3, 4]]
    ref = _decode_logits(stage, prompts, 4)
    monkeypatch.setattr(kernels, "_library", lambda: None)
    assert cpu_weight_layout(stage) == "column-major"
    assert all(p.dim() <= 2 for p in stage.parameters())
    assert torch.allclose(_decode_logits(stage, prompts, 4), ref, atol=1e-5)
