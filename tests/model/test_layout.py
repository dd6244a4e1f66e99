"""The HF <-> Megatron split table: exact inverses and Megatron's group-major QKV rows."""

from __future__ import annotations

import pytest
import torch

from shared.checkpoint.layout import Layout, hf_names, hf_shape, hf_to_shards, param_specs, shards_to_hf
from shared.config import ModelConfig
from shared.parallel.dims import LayoutError, ParallelDims
from tests.model.families import FAMILIES, make_hf_model


def _cfg(family):
    return ModelConfig.from_hf(make_hf_model(family).config.to_dict())


def test_fused_qkv_rows_are_group_major():
    """Row of query head i = g(r+2)d + jd + t; key g(r+2)d + rd + t; value g(r+2)d + (r+1)d + t."""
    hf = make_hf_model("llama3")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    sd = hf.state_dict()
    shards = hf_to_shards(sd, cfg, Layout(1, 1))[(0, 0)]
    fused = shards["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    r, d = cfg.queries_per_group, cfg.head_dim
    for i in range(cfg.num_heads):
        g, j = divmod(i, r)
        assert torch.equal(fused[g * (r + 2) * d + j * d: g * (r + 2) * d + (j + 1) * d], q[i * d:(i + 1) * d])
    for g in range(cfg.num_kv_heads):
        assert torch.equal(fused[g * (r + 2) * d + r * d: g * (r + 2) * d + (r + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(fused[g * (r + 2) * d + (r + 1) * d: (g + 1) * (r + 2) * d], v[g * d:(g + 1) * d])


def test_fc1_is_gate_then_up_on_every_rank():
    hf = make_hf_model("llama3")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    sd = hf.state_dict()
    shards = hf_to_shards(sd, cfg, Layout(2, 1))
    F = cfg.intermediate_size
    gate, up = sd["model.layers.2.mlp.gate_proj.weight"], sd["model.layers.2.mlp.up_proj.weight"]
    for t in range(2):
        fc1 = shards[(t, 0)]["decoder.layers.2.mlp.linear_fc1.weight"]
        assert torch.equal(fc1[: F // 2], gate[t * F // 2:(t + 1) * F // 2])
        assert torch.equal(fc1[F // 2:], up[t * F // 2:(t + 1) * F // 2])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_shard_unshard_is_bit_exact(family, tp, pp):
    hf = make_hf_model(family)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    sd = {k: v for k, v in hf.state_dict().items() if k in hf_names(cfg)}
    back = shards_to_hf(hf_to_shards(sd, cfg, Layout(tp, pp)), cfg, Layout(tp, pp))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
        assert tuple(sd[k].shape) == hf_shape(cfg, k)


def test_pipeline_stages_use_local_layer_numbers_and_tied_copy():
    cfg = _cfg("tied")
    shards = hf_to_shards(make_hf_model("tied").state_dict(), cfg, Layout(1, 2))
    first, last = shards[(0, 0)], shards[(0, 1)]
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.layers.0.input_layernorm.weight" in last and "decoder.layers.2.input_layernorm.weight" not in last
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    single = hf_to_shards(make_hf_model("tied").state_dict(), cfg, Layout(1, 1))[(0, 0)]
    assert "output_layer.weight" not in single


def test_padded_vocab_rows_are_zero():
    cfg = _cfg("llama2")
    shards = hf_to_shards(make_hf_model("llama2").state_dict(), cfg, Layout(2, 1))
    emb = torch.cat([shards[(t, 0)]["embedding.word_embeddings.weight"] for t in range(2)])
    assert emb.shape[0] == cfg.padded_vocab_size(2) == 512
    assert not emb[cfg.vocab_size:].any()


def test_specs_cover_every_stage_exactly_once():
    cfg = _cfg("llama3")
    specs = param_specs(cfg, Layout(2, 2))
    assert len({s.name for s in specs}) == len(specs)
    assert {s.pp_rank(cfg, Layout(2, 2)) for s in specs if s.layer is not None and s.layer < 2} == {0}


@pytest.mark.parametrize("dims,needle", [
    (ParallelDims(tp=4), "does not divide the 2 kv heads"),
    (ParallelDims(tp=3), "valid TP sizes for this model: [1, 2]"),
    (ParallelDims(pp=3), "does not divide the 4 layers; valid PP sizes: [1, 2, 4]"),
])
def test_invalid_layouts_say_what_to_change(dims, needle):
    with pytest.raises(LayoutError) as err:
        dims.check_model(_cfg("llama3"))
    assert needle in str(err.value)


def test_world_size_must_equal_product():
    with pytest.raises(LayoutError, match=r"world size 3 != TP\(2\) x PP\(2\) x DP\(1\) = 4"):
        ParallelDims(2, 2, 1).check_world(3)


def test_rank_order_is_tp_fastest_then_dp_then_pp():
    dims = ParallelDims(tp=2, pp=2, dp=2)
    assert [dims.coords(r) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]
    assert all(dims.rank(*dims.coords(r)) == r for r in range(8))
