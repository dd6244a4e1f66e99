"""Checkpoint conversion as one pure function, shared by the CLI and the conversion service.

Sources (HF-named tensors, read one at a time): an HF directory, a Meta directory, this
project's native checkpoint, or Megatron-LM's torch layout. Targets: the native format,
Megatron-LM's torch layout, or HF. Everything goes to a staging directory beside
``save_dir`` that replaces it only when complete (and validated); a cancelled or failed
conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from shared.config import ModelConfig
from shared.checkpoint import hf as hf_fmt
from shared.checkpoint import layout as param_layout
from shared.checkpoint import megatron_lm, native, parity
from shared.checkpoint.layout import Layout
from shared.checkpoint.opener import open_checkpoint
from shared.checkpoint.presets import check_preset
from shared.checkpoint.progress import Progress, ProgressTracker
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.hf import check_hf_shapes
from shared.checkpoint.staging import check_save_dir, staging_dir
from shared.checkpoint.tensors import TensorSource
from shared.dtypes import dtype_name, parse_dtype
from shared.files import sha256_file
from shared import tokenizer as tok
from shared.files import Stopped, keep_freed_memory, lower_thread_priority, usable_cpus

from shared.specs.convert import (CHECKPOINT_TYPES, CKPT_FORMATS, LOADERS, SAVERS, TRANSFORMER_IMPLS,
                                  VALIDATE_DTYPES, ConvertOptions)

__all__ = ["ConvertOptions", "Progress", "Cancelled", "convert"]

class Cancelled(Exception):
    """The conversion was cancelled by ``should_cancel``; nothing was written."""


@dataclass
class _Source:
    kind: str                      # hf | meta | native | megatron-lm
    cfg: ModelConfig
    tensors: TensorSource
    dtype: torch.dtype
    raw_config: dict[str, Any] | None
    generation: dict[str, Any] | None
    tokenizer_src: Path | None
    files: list[Path]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CheckpointError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_options(o: ConvertOptions) -> None:
    _choice("--loader", o.loader, LOADERS)
    _choice("--checkpoint-type", o.checkpoint_type, CHECKPOINT_TYPES)
    _choice("--saver", o.saver, SAVERS)
    _choice("--ckpt-format", o.ckpt_format, CKPT_FORMATS)
    _choice("--saver-transformer-impl", o.transformer_impl, TRANSFORMER_IMPLS)
    _choice("--validate-dtype", o.validate_dtype, VALIDATE_DTYPES)
    try:
        parse_dtype(o.dtype)
    except ValueError as e:
        raise CheckpointError(f"--dtype: {e}") from None
    for name, v in (("--target-tensor-parallel-size", o.target_tp), ("--target-pipeline-parallel-size", o.target_pp),
                    ("--make-vocab-size-divisible-by", o.make_vocab_size_divisible_by)):
        if v < 1:
            raise CheckpointError(f"{name} must be >= 1, got {v}")
    if not Path(o.load_dir).is_dir():
        raise CheckpointError(f"--load-dir {o.load_dir} does not exist or is not a directory")
    if Path(o.load_dir).resolve() == Path(o.save_dir).resolve():
        raise CheckpointError("--save-dir must differ from --load-dir")
    check_save_dir(Path(o.save_dir), o.overwrite)


# ---- sources --------------------------------------------------------------------------------

def _tokenizer_source(o: ConvertOptions, fallback: Path | None) -> Path:
    if o.tokenizer_model is not None:
        return Path(o.tokenizer_model)
    if fallback is not None:
        return fallback
    raise CheckpointError(f"no tokenizer found with the source in {o.load_dir}; pass --tokenizer-model "
                          "(a tokenizer.model file or an HF tokenizer directory)")


_LOADER_FORMATS = {("llama_mistral", "hf"): ("hf",), ("llama_mistral", "meta"): ("meta",),
                   ("mcore", "hf"): ("native", "megatron-lm"), ("mcore", "meta"): ("native", "megatron-lm")}


def _open_source(o: ConvertOptions) -> _Source:
    """The source through ``open_checkpoint``; ``--loader``/``--checkpoint-type`` say which formats to accept."""
    ckpt = open_checkpoint(o.load_dir, formats=_LOADER_FORMATS[(o.loader, o.checkpoint_type)],
                           tokenizer=o.tokenizer_model, true_vocab_size=o.true_vocab_size)
    tensors = ckpt.tensors(zero_copy=True)  # HF: only read, then written file to file
    tok_dir = Path(ckpt.tokenizer_dir) if ckpt.tokenizer_dir is not None else None
    kind = ckpt.format
    return _Source(kind, ckpt.config, tensors, ckpt.dtype, ckpt.source_config, ckpt.generation,
                   _tokenizer_source(o, tok_dir), ckpt.files())


def _target_config(o: ConvertOptions, src: _Source) -> ModelConfig:
    cfg = src.cfg
    rows = src.tensors.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in src.tensors \
        else cfg.vocab_size
    v = o.true_vocab_size or cfg.vocab_size
    if v > rows:
        raise CheckpointError(f"--true-vocab-size {v} exceeds the {rows} embedding rows of the source")
    return dataclasses.replace(cfg, vocab_size=v) if v != cfg.vocab_size else cfg


def _check_tokenizer(path: Path, cfg: ModelConfig) -> int:
    """The source tokenizer's size, checked against the model's vocabulary."""
    tok_size = tok.count_tokens(path)
    if tok_size > cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tok_size} tokens (added tokens included) but the model only {cfg.vocab_size} "
            "embeddings; pass the tokenizer that belongs to this model (--tokenizer-model)")
    return tok_size


# ---- provenance hashing in the background ----------------------------------------------------

class _Hasher(threading.Thread):
    """sha256 of the source files while the conversion runs (hashlib releases the GIL).

    At a lower priority than the writer's threads: the result is needed only for the manifest,
    so it fills the CPU time left while the disk catches up rather than delaying the writes.
    Several files (a sharded source) are hashed side by side, one per spare CPU; on two cores
    one at a time."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.files, self.result, self.error = files, {}, None
        self._stopping = threading.Event()

    def run(self) -> None:
        def one(p: Path) -> tuple[str, str]:
            return (p.name if p.parent == self.files[0].parent else str(p),
                    sha256_file(p, should_stop=self._stopping.is_set))

        n = max(1, min(len(self.files), usable_cpus() - 1))
        try:
            with ThreadPoolExecutor(n, initializer=lower_thread_priority, initargs=(10,)) as pool:
                self.result = dict(pool.map(one, self.files))  # in the files' order
        except Stopped:
            pass
        except OSError as e:
            self.error = e

    def stop(self) -> None:
        """Give up (the conversion failed): the thread ends at its next chunk."""
        self._stopping.set()

    def wait(self) -> dict[str, str]:
        self.join()
        if self.error:
            raise CheckpointError(f"cannot hash the source files: {self.error}")
        return self.result


# ---- the conversion -------------------------------------------------------------------------

@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Tensor copies run on one thread: the writer and hasher threads keep the other cores busy,
    and an idle OpenMP pool would spin on the cores they need."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def convert(opts: ConvertOptions, progress: Callable[[Progress], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> dict:
    """Convert ``opts.load_dir`` into ``opts.save_dir``; returns the manifest (or the export summary)."""
    _check_options(opts)
    keep_freed_memory()
    src = _open_source(opts)
    hasher = _Hasher(src.files)  # from the start: it is the longest single piece of work
    hasher.start()
    try:
        return _convert(opts, src, hasher, progress, should_cancel)
    finally:
        # a refused or failed conversion ends the hashing before returning: left running while the
        # interpreter exits, its worker pool would fail on shutdown and print a thread's traceback
        hasher.stop()
        hasher.join()


def _convert(opts: ConvertOptions, src: _Source, hasher: _Hasher, progress: Callable[[Progress], None] | None,
             should_cancel: Callable[[], bool] | None) -> dict:
    cfg = _target_config(opts, src)
    if opts.model_size:
        check_preset(opts.model_size, cfg)
    if src.kind in ("hf", "meta"):
        check_hf_shapes(src.tensors, dataclasses.replace(
            cfg, vocab_size=src.tensors.shape("model.embed_tokens.weight")[0])
            if "model.embed_tokens.weight" in src.tensors else cfg)
    layout = Layout(opts.target_tp, opts.target_pp, opts.make_vocab_size_divisible_by)
    if opts.saver != "hf":
        layout.check(cfg)
    dtype = parse_dtype(opts.dtype) or src.dtype
    report = lambda p: progress(p) if progress else None  # noqa: E731

    tok_size = _check_tokenizer(src.tokenizer_src, cfg)

    def step(tracker: ProgressTracker, nbytes: int) -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"conversion to {opts.save_dir} cancelled; nothing was written")
        report(tracker.step(nbytes))

    def validated(done: int, total: int) -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"conversion to {opts.save_dir} cancelled during validation; nothing was written")
        report(Progress("validate", done, total, "layers"))

    with staging_dir(Path(opts.save_dir), opts.overwrite) as out, _one_torch_thread():
        if opts.saver == "hf":
            result = _save_hf(out, cfg, src, dtype, step, report)
        elif opts.ckpt_format == "torch":
            result = _save_megatron_lm(out, cfg, layout, src, dtype, opts.transformer_impl, step, report)
        else:
            result = _save_native_tensors(out, cfg, layout, src, dtype, step, report)
        tok_dir = out if opts.saver == "hf" else out / tok.TOKENIZER_SUBDIR
        tok_files = tok.save_tokenizer(src.tokenizer_src, tok_dir)
        parity_report = None
        if opts.validate:
            parity_report = _validate(out, opts, cfg, layout, src, dtype, tok.load_source_tokenizer(src.tokenizer_src),
                                      validated)
        provenance = _provenance(opts, src, hasher.wait())
        if opts.saver != "hf" and opts.ckpt_format == "native":
            result = native.write_manifest(
                out, cfg, layout, dtype, file_hashes=result, source_config=src.raw_config,
                generation_config=src.generation or hf_fmt.generation_config(cfg),
                tokenizer={"dir": tok.TOKENIZER_SUBDIR, "files": tok_files, "vocab_size": tok_size},
                provenance=provenance, parity=parity_report)
        else:
            result.update(provenance=provenance, parity=parity_report)
            (out / "conversion.json").write_text(json.dumps(result, indent=2, default=str))
        result["save_dir"] = str(Path(opts.save_dir).absolute())
    return result


def _provenance(opts: ConvertOptions, src: _Source, files_sha256: dict) -> dict[str, Any]:
    """What was converted, how; with ``source_label`` set, no host path is recorded."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    where = {"dir": str(Path(opts.load_dir).resolve())}
    if opts.source_label is not None:
        options = {k: v for k, v in options.items() if k not in ("load_dir", "save_dir", "tokenizer_model")}
        where = {"checkpoint": opts.source_label}
        files_sha256 = {Path(k).name if isinstance(k, str) else k: v for k, v in files_sha256.items()}
    return {"command": opts.command or " ".join(shlex.quote(a) for a in sys.argv),
            "source": {"format": src.kind, **where, "dtype": dtype_name(src.dtype), "files_sha256": files_sha256},
            "options": options}


def _save_native_tensors(out: Path, cfg: ModelConfig, layout: Layout, src: _Source, dtype: torch.dtype,
                         step, report) -> dict[str, dict[str, Any]]:
    specs = native.stored_specs(cfg, layout)
    writer = native.CheckpointWriter(out, cfg, layout, dtype)
    tracker = ProgressTracker("convert", len(specs), writer.bytes_total)
    try:
        for spec in specs:
            p = spec.pp_rank(cfg, layout)
            hf = [param_layout.trim_vocab(spec, src.tensors.get(n), cfg) for n in spec.hf_names]
            nbytes = 0
            for t, pieces in enumerate(param_layout.shard_pieces(spec, hf, cfg, layout)):
                writer.add(t, p, spec.local_name(cfg, layout), pieces)
                nbytes += sum(piece.numel() for piece in pieces) * dtype.itemsize
            step(tracker, nbytes)
        hashes = writer.flush()
    except BaseException:
        writer.abort()
        raise
    report(Progress("write", 1, 1, "files", tracker.bytes_done, tracker.bytes_total, 0.0))
    return hashes


def _save_megatron_lm(out: Path, cfg: ModelConfig, layout: Layout, src: _Source, dtype: torch.dtype, impl: str,
                      step, report) -> dict[str, Any]:
    specs = param_layout.param_specs(cfg, layout)
    total = sum(torch.Size(native.shard_shape(s, cfg, layout)).numel() * layout.tp for s in specs) * dtype.itemsize
    tracker = ProgressTracker("convert", len(specs), total)
    return megatron_lm.write_megatron_lm(out, cfg, layout, src.tensors, dtype, impl,
                                         on_tensor=lambda name, n: step(tracker, n))


def _save_hf(out: Path, cfg: ModelConfig, src: _Source, dtype: torch.dtype, step, report) -> dict[str, Any]:
    names = param_layout.hf_names(cfg)
    total = sum(torch.Size(param_layout.hf_shape(cfg, n)).numel() for n in names) * dtype.itemsize
    tracker = ProgressTracker("export", len(names), total)

    def tensors():
        for n in names:
            yield n, param_layout.trim_vocab(n, src.tensors.get(n), cfg)

    return hf_fmt.write_hf(out, cfg, tensors(), dtype, generation=src.generation or hf_fmt.generation_config(cfg),
                           on_tensor=lambda name, n: step(tracker, n))


def _validate(out: Path, o: ConvertOptions, cfg: ModelConfig, layout: Layout, src: _Source, dtype: torch.dtype,
              tokenizer, on_step: Callable[[int, int], None]) -> dict[str, Any]:
    """The streaming parity report of the written checkpoint at its own TP/PP (``shared.checkpoint.parity``)."""
    if o.saver == "hf":
        written = parity.Written("hf", str(out), Layout(1, 1, layout.divisible_by))
    else:
        written = parity.Written("megatron-lm" if o.ckpt_format == "torch" else "native", str(out), layout)
    rep = parity.check(cfg, src.tensors, written, tokenizer, dtype, compute_dtype=parse_dtype(o.validate_dtype),
                       on_step=on_step)
    parity.store_report(out, rep)
    if not rep.passed:
        raise parity.ParityError(f"the converted checkpoint failed validation ({rep.summary()}); nothing was "
                                 "written. Report this with the source checkpoint, or pass --no-validate to skip")
    return rep.to_dict()
