"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from shared.parallel.launcher import ProcessGroupPool

P2P_CHECK_S = 120.0  # a peer slower than this to post its receive counts as a deadlock


@pytest.fixture(scope="session")
def dist_pool():
    """Four spawned gloo workers, reused by every multi-process test (spawning costs seconds).

    ``dist_pool.run(ParallelDims(tp, pp), fn, *args)`` runs ``fn(ctx, *args)`` on the layout's
    ranks. A test that breaks the pool gets it restarted for the next one. Point-to-point
    transfers are checked as NCCL orders them (``shared.parallel.p2p``): a pipeline schedule
    that would hang on GPUs fails here.
    """
    def start():
        return ProcessGroupPool(4, "gloo", p2p_check_s=P2P_CHECK_S)

    holder = {"pool": start()}

    class _Pool:
        def run(self, dims, fn, *args, **kw):
            if holder["pool"].broken:
                holder["pool"] = start()
            return holder["pool"].run(dims, fn, *args, **kw)

    yield _Pool()
    holder["pool"].close()


# ---- tiny HF checkpoints on disk ----------------------------------------------------------------

_CORPUS = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea, "
           "there lived an old fisherman. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + "
           "fibonacci(n - 2). The capital of France is Paris; the capital of Italy is Rome. ")


def _spm_file(version: str):
    import mistral_common
    from pathlib import Path

    names = {"spm-v1": "tokenizer.model.v1", "spm-v3": "mistral_instruct_tokenizer_240323.model.v3"}
    return Path(mistral_common.__file__).parent / "data" / names[version]


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A small real byte-level BPE tokenizer (trained here), saved as an HF tokenizer dir; adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([_CORPUS] * 20, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return out


@pytest.fixture
def make_hf_checkpoint(tmp_path, bpe_tokenizer_dir):
    """Factory: ``make_hf_checkpoint(family, tokenizer=None, dtype=torch.float32, seed=0, name=None)``.

    Writes a tiny random HF checkpoint (config.json, model.safetensors, generation_config.json
    and a real tokenizer) of a family from tests/model/families.py and returns its directory.
    ``tokenizer``: "bpe" (small trained BPE), "spm-v1" / "spm-v3" (mistral-common's real
    SentencePiece models, 32000 / 32768 tokens; the vocab follows); default: spm-v3 for
    mistral, spm-v1 for llama2, bpe otherwise.
    """
    import shutil

    import torch

    from tests.model.families import FAMILIES, make_hf_model

    def make(family: str = "llama3", tokenizer: str | None = None, dtype=torch.float32, seed: int = 0,
             name: str | None = None, **config_overrides):
        tokenizer = tokenizer or {"mistral": "spm-v3", "llama2": "spm-v1"}.get(family, "bpe")
        vocab = {"spm-v1": 32000, "spm-v3": 32768}.get(tokenizer)
        _, _, extra = FAMILIES[family]
        saved = dict(extra)
        try:
            extra.update(config_overrides)
            if vocab:
                extra["vocab_size"] = vocab
            model = make_hf_model(family, seed=seed)
        finally:
            extra.clear()
            extra.update(saved)
        model = model.to(dtype)
        out = tmp_path / (name or f"hf-{family}-{tokenizer}-{str(dtype).split('.')[-1]}-{seed}")
        model.save_pretrained(out)
        if tokenizer == "bpe":
            for f in bpe_tokenizer_dir.iterdir():
                shutil.copyfile(f, out / f.name)
        else:
            from shared.tokenizer import save_tokenizer

            save_tokenizer(_spm_file(tokenizer), out)
        return out

    return make


@pytest.fixture
def spm_file():
    """Path of one of mistral-common's real SentencePiece models: ``spm_file("spm-v3")``."""
    return _spm_file
