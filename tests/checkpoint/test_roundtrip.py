"""Round trips and reshard chains are bit-identical; resharding on load equals resharding on disk."""

from __future__ import annotations

import pytest
import torch

from shared.checkpoint import native
from shared.checkpoint.layout import Layout
from tests.checkpoint.helpers import assert_bit_identical, ckpt_logits, hf_logits, hf_tensors, run


@pytest.mark.parametrize("family", ["llama3", "tied", "qkv_bias"])
def test_reshard_chain_is_bit_identical(make_hf_checkpoint, tmp_path, family):
    src = make_hf_checkpoint(family)
    run(src, tmp_path / "tp1", validate=False)
    run(tmp_path / "tp1", tmp_path / "tp2pp2", loader="mcore", target_tp=2, target_pp=2, validate=False)
    run(tmp_path / "tp2pp2", tmp_path / "back", loader="mcore", validate=False)
    assert_bit_identical(native.load_rank_state_dict(tmp_path / "tp1", 0, 0),
                         native.load_rank_state_dict(tmp_path / "back", 0, 0))
    run(tmp_path / "back", tmp_path / "hf", loader="mcore", saver="hf", validate=False)
    assert_bit_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_reshard_on_load_equals_reshard_on_disk(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3")
    run(src, tmp_path / "a", target_tp=2, target_pp=1, validate=False)
    run(tmp_path / "a", tmp_path / "b", loader="mcore", target_tp=1, target_pp=4, validate=False)
    target = Layout(1, 4)
    for p in range(4):
        assert_bit_identical(native.load_rank_state_dict(tmp_path / "a", 0, p, target),
                             native.load_rank_state_dict(tmp_path / "b", 0, p))


def test_dtype_change_and_reshard_validated(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama2", tokenizer="bpe")
    m = run(src, tmp_path / "bf16", dtype="bf16", target_tp=2)
    assert m["dtype"] == "bf16" and m["parity"]["passed"] and m["parity"]["dtype"] == "bf16"
    sd = native.load_rank_state_dict(tmp_path / "bf16", 1, 0)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    # exported bf16 HF equals the source rounded to bf16
    run(tmp_path / "bf16", tmp_path / "hf", loader="mcore", saver="hf")
    assert_bit_identical({k: v.to(torch.bfloat16) for k, v in hf_tensors(src).items()}, hf_tensors(tmp_path / "hf"))
    torch.testing.assert_close(ckpt_logits(tmp_path / "bf16"), hf_logits(tmp_path / "hf"), atol=1e-3, rtol=1e-3)


def test_hf_export_loads_with_transformers(make_hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_hf_checkpoint("llama3.1")
    run(src, tmp_path / "c", target_tp=2, target_pp=2, validate=False)
    summary = run(tmp_path / "c", tmp_path / "hf", loader="mcore", saver="hf")
    assert summary["parity"]["passed"]
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").exists() and (out / "generation_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello").input_ids == AutoTokenizer.from_pretrained(src)("hello").input_ids
    torch.testing.assert_close(hf_logits(out), hf_logits(src), atol=0, rtol=0)


def test_hf_export_shards_with_index(make_hf_checkpoint, tmp_path):
    from shared.checkpoint import hf as hf_fmt
    from shared.checkpoint.tensors import open_hf_weights

    src = make_hf_checkpoint("llama3")
    src_sd = hf_tensors(src)
    m, source = native.open_native(run(src, tmp_path / "c", validate=False)["save_dir"])
    hf_fmt.write_hf(tmp_path / "hf", m.config, ((n, source.get(n)) for n in source.names()), torch.float32,
                    max_shard_bytes=200_000)
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2
    w = open_hf_weights(tmp_path / "hf")
    assert_bit_identical(src_sd, {n: w.get(n) for n in w.names()})
