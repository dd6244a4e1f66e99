"""Tiny real HF checkpoints (random weights, a small trained BPE tokenizer) for tests, benchmarks
and local smoke runs: ``python -m shared.samples OUT_DIR`` writes one and lists its files."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = ("the quick brown fox jumps over the lazy dog. a checkpoint is converted, resharded and served. "
        "hello world, tensor and pipeline parallel layouts split the layers and the heads. ") * 20


def make_tokenizer(out: Path, vocab: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)


def make_hf_checkpoint(out: Path, *, hidden: int = 64, layers: int = 2, ffn: int = 128, heads: int = 4,
                       kv_heads: int = 2, vocab: int = 384, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rope_theta=1e4, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    import sys

    p = make_hf_checkpoint(Path(sys.argv[1]))
    print(json.dumps(sorted(x.name for x in p.iterdir())))
