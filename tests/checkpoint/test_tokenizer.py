"""Tokenizers: SentencePiece models and HF dirs load, add BOS, and travel with checkpoints."""

from __future__ import annotations

import json

import pytest

from shared import tokenizer as tok
from tests.checkpoint.helpers import run

# Runs of several spaces are left out: like transformers' own conversion of Llama tokenizers,
# the converted tokenizer may split them differently from sentencepiece (decoding still agrees).
TEXTS = ["Hello world, this is a test.", "The capital of France is Paris.", "日本語 and ünïcode 123",
         "def f(x):\n\treturn x * 2", "x"]


@pytest.mark.parametrize("version,size", [("spm-v1", 32000), ("spm-v3", 32768)])
def test_sentencepiece_model_matches_sentencepiece(spm_file, version, size):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_file(version)))
    t = tok.load_source_tokenizer(spm_file(version))
    assert tok.vocab_size(t) == size == tok.count_tokens(spm_file(version))
    for text in TEXTS:
        assert t(text).input_ids == [sp.bos_id()] + sp.encode(text), text
        assert t.decode(t(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert (t.bos_token_id, t.eos_token_id) == (sp.bos_id(), sp.eos_id())
    if version == "spm-v3":  # control tokens are special tokens, as mistral-common encodes them
        assert t("[INST]").input_ids == [1, sp.piece_to_id("[INST]")] == [1, 3]


def test_mistral_spm_checkpoint_carries_its_tokenizer(make_hf_checkpoint, spm_file, tmp_path):
    """--tokenizer-model given as a tokenizer.model file; load_tokenizer(ckpt) tokenizes like the source."""
    import sentencepiece as spm

    src = make_hf_checkpoint("mistral")
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (src / f).unlink()
    m = run(src, tmp_path / "out", tokenizer_model=spm_file("spm-v3"), target_tp=2, validate=False)
    assert m["tokenizer"]["vocab_size"] == 32768 and "tokenizer.model" in m["tokenizer"]["files"]
    t = tok.load_tokenizer(tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(spm_file("spm-v3")))
    for text in TEXTS:
        assert t(text).input_ids == [1] + sp.encode(text)


def test_added_tokens_count_toward_vocab(bpe_tokenizer_dir, tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(bpe_tokenizer_dir, d)
    t = tok.load_source_tokenizer(d)
    base = tok.vocab_size(t)
    t.add_tokens(["<extra_a>", "<extra_b>"])
    t.save_pretrained(d)
    assert tok.vocab_size(tok.load_source_tokenizer(d)) == base + 2 == tok.count_tokens(d)


def test_tokenizer_larger_than_model_is_refused(make_hf_checkpoint, spm_file, tmp_path):
    from shared.checkpoint.errors import CheckpointError

    src = make_hf_checkpoint("llama3")  # 333 embeddings
    with pytest.raises(CheckpointError, match="tokenizer has 32768 tokens.*only 333"):
        run(src, tmp_path / "out", tokenizer_model=spm_file("spm-v3"))


def test_hf_tokenizer_files_copied_verbatim(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3")
    run(src, tmp_path / "out", validate=False)
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    t = tok.load_tokenizer(tmp_path / "out")
    assert t("hello").input_ids[0] == t.bos_token_id
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"]["dir"] == "tokenizer"
