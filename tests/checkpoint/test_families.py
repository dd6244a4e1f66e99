"""Every family converted at several TP/PP layouts reproduces HF's logits."""

from __future__ import annotations

import json

import pytest
import torch

from shared.checkpoint import native
from tests.checkpoint.helpers import PROMPT_IDS, assert_bit_identical, ckpt_logits, hf_logits, hf_tensors, run

CASES = [
    ("llama2", 1, 1), ("llama2", 4, 2),
    ("llama3", 2, 2), ("llama3", 1, 4),
    ("llama3.1", 2, 1),
    ("mistral", 2, 4),
    ("tied", 1, 1), ("tied", 2, 2),
    ("qkv_bias", 2, 2),
]
CASES_FIRST = {}
for _f, _t, _p in CASES:
    CASES_FIRST.setdefault(_f, (_t, _p))


@pytest.mark.parametrize("family,tp,pp", CASES, ids=[f"{f}-tp{t}pp{p}" for f, t, p in CASES])
def test_family_matches_hf(make_hf_checkpoint, tmp_path, family, tp, pp):
    src = make_hf_checkpoint(family)
    out = tmp_path / "out"
    validate = (tp, pp) == CASES_FIRST[family]  # the parity check costs seconds; once per family
    manifest = run(src, out, target_tp=tp, target_pp=pp, validate=validate)

    if validate:
        assert manifest["parity"]["passed"] and manifest["parity"]["greedy_agreement"] == 1.0
        assert (out / "parity.txt").read_text().startswith("parity PASS")
    lay = manifest["layout"]
    assert (lay["tp"], lay["pp"]) == (tp, pp)
    assert lay["padded_vocab_size"] % (128 * tp) == 0 and lay["padded_vocab_size"] >= lay["vocab_size"]
    assert lay["stages"] == [[p * 4 // pp, (p + 1) * 4 // pp] for p in range(pp)]
    assert manifest["source_config"] == json.loads((src / "config.json").read_text())
    native.verify(out)

    ids = PROMPT_IDS.clamp(max=manifest["model"]["vocab_size"] - 1)
    ref = hf_logits(src, ids)
    got = ckpt_logits(out, ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    # and back to HF, bit for bit
    run(out, tmp_path / "hf", loader="mcore", saver="hf", validate=False)
    assert_bit_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_manifest_describes_everything(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3.1")
    m = run(src, tmp_path / "out", target_tp=2, dtype="bf16", validate=False)
    model = m["model"]
    assert model["rope_theta"] == 5e5
    assert model["rope_scaling"]["kind"] == "llama3" and model["rope_scaling"]["original_max_position_embeddings"] == 16
    assert m["dtype"] == "bf16"
    assert set(m["files"]) >= {"model_tp0_pp0.safetensors", "model_tp1_pp0.safetensors", "tokenizer/tokenizer.json"}
    assert m["tokenizer"]["vocab_size"] > 0
    prov = m["provenance"]
    assert prov["source"]["files_sha256"]["model.safetensors"] == native.sha256_file(src / "model.safetensors")
    assert prov["converter"] and prov["command"]
    # the loaded config is the manifest's, whatever the defaults
    loaded = native.load_manifest(tmp_path / "out")
    assert loaded.config.rope_scaling.factor == 8.0 and loaded.dtype == torch.bfloat16


def test_meta_multishard_matches_hf(make_hf_checkpoint, tmp_path, spm_file):
    """A real two-shard Meta checkpoint (inverse permutation + split) converts to HF's logits."""
    import shutil

    from shared.checkpoint import meta
    from shared.checkpoint.hf import read_hf_config
    from shared.config import ModelConfig

    src = make_hf_checkpoint("llama3", tokenizer="spm-v1", num_key_value_heads=4, intermediate_size=192)
    cfg = ModelConfig.from_hf(read_hf_config(src))
    meta_dir = tmp_path / "meta"
    # 8/3*64 = 170 -> multiple_of 64 -> 192
    meta.write_meta(meta_dir, hf_tensors(src), cfg, num_shards=2, multiple_of=64)
    shutil.copyfile(spm_file("spm-v1"), meta_dir / "tokenizer.model")
    assert sorted(p.name for p in meta_dir.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]

    m = run(meta_dir, tmp_path / "out", checkpoint_type="meta", target_tp=2, target_pp=2)
    assert m["parity"]["passed"]
    torch.testing.assert_close(ckpt_logits(tmp_path / "out"), hf_logits(src), atol=1e-4, rtol=1e-4)
    run(tmp_path / "out", tmp_path / "hf", loader="mcore", saver="hf", validate=False)
    assert_bit_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))
