"""The real SmolLM2-135M (tied embeddings, GQA 9/3, 30 layers): converted, validated, exported."""

from __future__ import annotations

import pytest

from shared.assets import smollm2_hf_dir
from shared.checkpoint import native
from tests.checkpoint.helpers import assert_bit_identical, hf_tensors, run


@pytest.mark.slow
def test_smollm2_tp3_pp2_validated_and_exported_bit_identical(tmp_path):
    src = smollm2_hf_dir()
    m = run(src, tmp_path / "tp3pp2", target_tp=3, target_pp=2)
    assert m["parity"]["passed"] and m["parity"]["greedy_agreement"] == 1.0
    assert m["layout"]["stages"] == [[0, 15], [15, 30]] and m["layout"]["padded_vocab_size"] == 49152
    assert m["model"]["tie_word_embeddings"] and m["model"]["rope_theta"] == 100000.0
    native.verify(tmp_path / "tp3pp2")
    run(tmp_path / "tp3pp2", tmp_path / "hf", loader="mcore", saver="hf", validate=False)
    assert_bit_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))
