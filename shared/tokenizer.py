"""Tokenizers: load from an HF tokenizer directory or a SentencePiece ``tokenizer.model``.

Whatever the source, a checkpoint carries an HF tokenizer (``tokenizer.json`` +
``tokenizer_config.json``) so ``load_tokenizer(ckpt_dir)`` always returns a transformers
tokenizer whose ``tokenizer(prompt).input_ids`` adds BOS as the source model expects.
A SentencePiece model is converted the way transformers converts Llama tokenizers (byte
fallback BPE, BOS prepended) and the original ``tokenizer.model`` is kept beside it. As with
transformers' own conversion, runs of several spaces may split into different (equivalent)
pieces than sentencepiece produces; decoding agrees.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path
from typing import Iterator

HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt",
)
from shared.paths import UnsafePath, check_tree, contained

TOKENIZER_SUBDIR = "tokenizer"


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or read; the message says what to pass instead."""


def _spm_to_hf(model_file: Path):
    """Build a transformers fast tokenizer equivalent to a SentencePiece BPE model."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as e:
        raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from e
    if sp.bos_id() < 0:
        raise TokenizerError(f"{model_file}: the SentencePiece model defines no BOS token")
    extracted = SentencePieceExtractor(str(model_file)).extract(BPE)
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(BPE(extracted["vocab"], extracted["merges"], unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([t for t in extracted["additional_special_tokens"] if t.special])
    bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk)


def _hf_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists())


def resolve_tokenizer_dir(path: Path) -> Path:
    """Where a checkpoint (native, HF or Megatron-LM with a tokenizer/ dir) keeps its tokenizer."""
    path = Path(path)
    manifest = path / "manifest.json"
    raw = json.loads(manifest.read_text()) if manifest.is_file() else None
    if isinstance(raw, dict) and raw.get("format") != "hf":  # a native manifest names its tokenizer dir
        sub = (raw.get("tokenizer") or {}).get("dir", TOKENIZER_SUBDIR)
        try:
            return contained(path, sub, "tokenizer directory")
        except UnsafePath as e:
            raise TokenizerError(str(e)) from None
    if (path / TOKENIZER_SUBDIR).is_dir():
        return path / TOKENIZER_SUBDIR
    return path


def load_source_tokenizer(path: str | Path):
    """A transformers tokenizer from an HF tokenizer dir, a ``tokenizer.model`` file, or a dir holding one."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer {path} does not exist; pass --tokenizer-model FILE_OR_DIR")
    if path.is_file():
        return _spm_to_hf(path)
    try:
        check_tree(path, "tokenizer")  # transformers opens the files it finds by itself
    except UnsafePath as e:
        raise TokenizerError(str(e)) from None
    if (path / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load the HF tokenizer ({e})") from e
    if (path / "tokenizer.model").exists():
        return _spm_to_hf(path / "tokenizer.model")
    if _hf_dir(path):
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load the HF tokenizer ({e})") from e
    raise TokenizerError(
        f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model); pass --tokenizer-model")


def vocab_size(tokenizer) -> int:
    """The true vocabulary size, added tokens included."""
    return len(tokenizer)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def count_tokens(path: str | Path) -> int:
    """``vocab_size(load_source_tokenizer(path))`` - one more than the largest token id - read
    straight from ``tokenizer.json`` or the SentencePiece model, without building a tokenizer."""
    path = Path(path)
    spm_file = path if path.is_file() else path / "tokenizer.model"
    if path.is_dir() and (path / "tokenizer.json").exists():
        try:
            with _no_gc():  # a large JSON would otherwise set off several full collections
                spec = json.loads((path / "tokenizer.json").read_text())
            vocab = spec["model"]["vocab"]
            ids = [len(vocab) - 1] if isinstance(vocab, list) else list(vocab.values())
            ids += [int(t["id"]) for t in spec.get("added_tokens") or []]
            if (path / "tokenizer_config.json").exists():
                config = json.loads((path / "tokenizer_config.json").read_text())
                ids += [int(i) for i in config.get("added_tokens_decoder") or {}]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: cannot read the HF tokenizer ({e}); pass a valid --tokenizer-model") from e
        return max(ids) + 1
    if spm_file.is_file():
        import sentencepiece as spm

        try:
            return spm.SentencePieceProcessor(model_file=str(spm_file)).get_piece_size()
        except Exception as e:
            raise TokenizerError(f"{spm_file}: not a SentencePiece model ({e})") from e
    return vocab_size(load_source_tokenizer(path))


def save_tokenizer(source: str | Path, dest_dir: Path) -> list[str]:
    """Write the source's tokenizer into ``dest_dir`` in HF form; returns the file names written.

    HF tokenizer files are copied verbatim; a SentencePiece model is converted and kept.
    """
    source = Path(source)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if source.is_dir() and (source / "tokenizer.json").exists():
        for name in HF_TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, dest_dir / name)
    else:
        tok = load_source_tokenizer(source)
        tok.save_pretrained(str(dest_dir))
        spm_file = source if source.is_file() else source / "tokenizer.model"
        shutil.copyfile(spm_file, dest_dir / "tokenizer.model")
    return sorted(p.name for p in dest_dir.iterdir() if p.is_file())


def load_tokenizer(ckpt_dir: str | Path):
    """The tokenizer of a checkpoint this project wrote (or any HF tokenizer dir)."""
    return load_source_tokenizer(resolve_tokenizer_dir(Path(ckpt_dir)))
