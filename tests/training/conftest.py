"""A tiny Llama with a real BPE tokenizer trained on real text found on disk, and JSONL data files."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def license_paragraphs(limit_chars: int = 60_000) -> list[str]:
    """Paragraphs of the license texts shipped with installed packages (sorted, so the same every run)."""
    texts = []
    for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"] or ""):
        for f in dist.files or []:
            name = f.name.upper()
            if name.startswith(("LICENSE", "COPYING")) and f.suffix in ("", ".txt", ".md", ".rst"):
                path = Path(f.locate())
                if path.is_file():
                    texts.append(path.read_text(errors="ignore"))
    paras = [" ".join(p.split()) for t in texts for p in t.split("\n\n")]
    out, total = [], 0
    for p in paras:
        if len(p) >= 80 and p not in out:
            out.append(p)
            total += len(p)
            if total > limit_chars:
                break
    assert len(out) > 50, "expected license texts of installed packages on disk"
    return out


def make_tokenizer(paras: list[str], vocab: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(paras, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHATML
    return hf


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.checkpoint.layout import Layout
    from shared.checkpoint.native import write_checkpoint
    from shared.config import ModelConfig
    from shared.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("train-assets")
    paras = license_paragraphs()
    tok = make_tokenizer(paras)
    hf_dir = root / "hf"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e4, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    native = root / "native"
    write_checkpoint(native, cfg, Layout(2, 1), dict(model.state_dict()), tokenizer={"dir": "tokenizer"})
    save_tokenizer(hf_dir, native / "tokenizer")
    text = write_jsonl(root / "text.jsonl", [{"text": p} for p in paras[:120]])
    pc = write_jsonl(root / "pc.jsonl", [{"prompt": p[:60], "completion": p[60:200]} for p in paras[:40]])
    chat = write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": p[:50]},
                      {"role": "assistant", "content": p[50:150]}]} for p in paras[:40]])
    return SimpleNamespace(root=root, hf=hf_dir, native=native, tok=tok, cfg=cfg, model=model, text=text, pc=pc,
                           chat=chat, paras=paras)
