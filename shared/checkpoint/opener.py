"""One way to open a checkpoint: ``open_checkpoint(path)`` gives a ``Checkpoint`` handle.

The format is what the directory declares, never what its name suggests:

    native        manifest.json of this project's format (any readable version)
    hf            config.json with its weights; or an HF checkpoint as the object store fetched
                  it (a store manifest.json saying ``format: hf``)
    meta          params.json beside consolidated.NN.pth
    megatron-lm   latest_checkpointed_iteration.txt naming an iteration of mp_rank_*/model_optim_rng.pt
    a run         what finetuning writes with ``--save OUT``: the tracker names an iter_NNNNNNN/ that
                  is a native checkpoint (see shared.checkpoint.run). It opens as that native
                  iteration - the latest complete one unless ``iteration`` asks for another or for
                  ``"release"`` - with its training state.
    random        ``Checkpoint.random(config.json)``: random weights of that shape (benchmarks)

A ``Checkpoint`` is small and picklable: a controller opens it once and hands it to every
rank, which reads only its own shard with ``rank_state`` at whatever layout it runs
(resharded on the fly). ``tensors()`` reads the whole model one tensor at a time under HF names.
Errors are ``CheckpointError``s naming the problem and the fix; they name the checkpoint as the
caller passed it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from shared.checkpoint import run as run_dir
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.layout import Layout
from shared.checkpoint.tensors import TensorSource
from shared.config import ModelConfig
from shared.paths import UnsafePath, contained

FORMATS = ("native", "hf", "meta", "megatron-lm")
RANDOM = "random"
MANIFEST = "manifest.json"
_HINTS = {
    "native": "a converted checkpoint (manifest.json)",
    "hf": "an HF checkpoint (config.json)",
    "meta": "a Meta checkpoint (params.json, consolidated.*.pth)",
    "megatron-lm": f"a Megatron-LM torch checkpoint ({run_dir.LATEST}, iter_*/mp_rank_*)",
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as it is stored: what it is, where, and how to read one rank's part of it."""

    format: str                           # native | hf | meta | megatron-lm | random
    directory: str                        # the weights (a run's chosen iteration; random: the config.json)
    config: ModelConfig
    dtype: torch.dtype                    # as stored
    layout: Layout                        # as stored (HF, Meta, random: TP1·PP1)
    tokenizer_dir: str | None = None      # an HF tokenizer dir or a dir with tokenizer.model; None: none stored
    name: str = ""                        # the checkpoint as the caller named it
    run: str | None = None                # the training run directory it was opened through
    iteration: int | str | None = None    # the run's iteration (a number or "release")
    state: dict[str, Any] | None = field(default=None, compare=False)           # training/state.json
    generation: dict[str, Any] | None = field(default=None, compare=False)      # generation config, if stored
    source_config: dict[str, Any] | None = field(default=None, compare=False)   # config.json / params.json
    seed: int = 0                         # random weights

    @classmethod
    def random(cls, config_path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> "Checkpoint":
        """Random weights of the shapes an HF ``config.json`` describes (benchmarks)."""
        from shared.checkpoint.hf import read_hf_config

        p = Path(config_path)
        raw = read_hf_config(p.parent) if p.name == "config.json" else _json_file(p)
        return cls(RANDOM, str(p), ModelConfig.from_hf(raw), dtype, Layout(), name=p.name, source_config=raw,
                   seed=seed)

    # ---- facts ------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.name or Path(self.directory).name

    @property
    def served_name(self) -> str:
        """The name a server reports for it by default: the run's directory, else the checkpoint's."""
        return Path(self.run or self.directory).resolve().name

    @property
    def lora_base(self) -> bool:
        """A LoRA run's training iteration: its model files are the frozen base weights."""
        return bool(self.state) and self.state.get("config", {}).get("finetune_method") == "lora"

    def generation_config(self) -> dict[str, Any]:
        return dict(self.generation or {})

    def eos_ids(self, tokenizer=None) -> tuple[int, ...]:
        """Every EOS id of the generation config, else the model config's, else the tokenizer's."""
        eos = self.generation_config().get("eos_token_id")
        if eos is not None:
            return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
        if self.config.eos_token_ids:
            return tuple(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            return (int(tokenizer.eos_token_id),)
        return ()

    def tokenizer(self):
        """The stored tokenizer (transformers), or None where none is stored (random weights)."""
        if self.tokenizer_dir is None:
            if self.format == RANDOM:
                return None
            raise CheckpointError(f"{self.label} stores no tokenizer (tokenizer.json or tokenizer.model); add one "
                                  "to the checkpoint, or convert it again with --tokenizer-model")
        from shared.tokenizer import load_source_tokenizer

        return load_source_tokenizer(self.tokenizer_dir)

    def manifest(self):
        """The native manifest (``shared.checkpoint.native.Manifest``)."""
        from shared.checkpoint import native

        if self.format != "native":
            raise CheckpointError(f"{self.label} is {_HINTS.get(self.format, self.format)}, which has no manifest")
        return native.load_manifest(self.directory)

    def files(self) -> list[Path]:
        """The files the weights and config are read from (for provenance hashes)."""
        d = Path(self.directory)
        if self.format == "native":
            return [d / n for n in self.manifest().files] + [d / MANIFEST]
        if self.format == "megatron-lm":
            from shared.checkpoint import megatron_lm

            return megatron_lm.files(d)
        if self.format == RANDOM:
            return [d]
        src = self.tensors()
        try:
            return src.files() + [d / ("params.json" if self.format == "meta" else "config.json")]
        finally:
            src.close()

    # ---- reading ----------------------------------------------------------------------------
    def tensors(self, zero_copy: bool = False) -> TensorSource:
        """Every tensor under its HF name, read one at a time (``zero_copy``: HF safetensors are
        read-only views of the files). The caller closes it."""
        d = Path(self.directory)
        if self.format == "native":
            from shared.checkpoint import native

            return native.open_native(d)[1]
        if self.format == "hf":
            from shared.checkpoint.tensors import open_hf_weights

            return open_hf_weights(d, zero_copy=zero_copy)
        if self.format == "meta":
            from shared.checkpoint.meta import MetaSource

            return MetaSource(d, self.config)
        if self.format == "megatron-lm":
            from shared.checkpoint import megatron_lm

            return megatron_lm.open_megatron_lm(d, self.config.vocab_size)[4]
        raise CheckpointError(f"{self.label} holds random weights, not tensors to read; open a stored checkpoint")

    def rank_state(self, layout: Layout, tp_rank: int, pp_rank: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Rank (tp_rank, pp_rank)'s local state dict at ``layout`` (any layout the model allows),
        in ``dtype`` (None: as stored). Reads only the parameters of that rank's stage."""
        layout.check(self.config)
        if not (0 <= tp_rank < layout.tp and 0 <= pp_rank < layout.pp):
            raise CheckpointError(f"rank (tp={tp_rank}, pp={pp_rank}) is outside TP={layout.tp} x PP={layout.pp}")
        if self.format == RANDOM:
            from shared.checkpoint.in_memory import random_state

            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            return random_state(self.config, layout, tp_rank, pp_rank, dtype or self.dtype, device, self.seed)
        if self.format == "native":
            from shared.checkpoint.native import load_rank_state_dict

            return load_rank_state_dict(self.directory, tp_rank, pp_rank, target=layout, dtype=dtype)
        from shared.checkpoint.native import shards_for_rank

        src = self.tensors()
        try:
            return shards_for_rank(src, self.config, layout, tp_rank, pp_rank, lambda t: _owned(t, dtype))
        finally:
            src.close()


def _owned(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype``, holding only its own bytes (never a view keeping a whole source tensor alive)."""
    t = t.to(dtype) if dtype is not None else t
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _json_file(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path.name} is not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name} holds a JSON {type(raw).__name__}, not an object")
    return raw


# ---- what a directory declares -------------------------------------------------------------------

def declared(d: Path, prefer: Sequence[str] | None = None) -> str | None:
    """What ``d`` declares itself to be: a format, ``"tracked"`` (a tracker file: a training run
    or Megatron-LM), ``"run"`` (a run directory with only its release/), or None. Where it
    declares several (config.json beside params.json), the first of ``prefer`` wins."""
    from shared.checkpoint.native import declared_format

    manifest = declared_format(d)
    found = [manifest] if manifest is not None else []
    if (d / run_dir.LATEST).is_file():
        found.append("tracked")
    if (d / run_dir.RELEASE / MANIFEST).is_file():
        found.append("run")
    if (d / "params.json").is_file():
        found.append("meta")
    if (d / "config.json").is_file():
        found.append("hf")
    if manifest is not None:
        return manifest  # a manifest says what the directory is
    return next((f for f in found if f in (prefer or ())), found[0] if found else None)


def _tracked(d: Path, name: str, asked: int | str | None) -> tuple[str, int | str]:
    """The iteration to open under a tracker file, and whose tracker it is: a training run's
    (the iteration is a native checkpoint) or Megatron-LM's (mp_rank_* directories)."""
    it = run_dir.read_tracker(d) if asked is None else run_dir.check_iteration(asked, "the iteration asked for")
    target = _iteration_path(d, it, name)
    if (target / MANIFEST).is_file():
        return "run", it
    if target.is_dir() and any(target.glob("mp_rank_*")):
        if asked is not None and it != run_dir.read_tracker(d):
            raise CheckpointError(f"{name}: a Megatron-LM checkpoint opens at the iteration {run_dir.LATEST} names; "
                                  "drop the iteration")
        return "megatron-lm", it
    if not target.is_dir() and asked is not None:
        raise CheckpointError(f"{name}: there is no iteration {it} ({target.name}/ does not exist; saved: "
                              f"{_saved(d)}); pass an iteration that exists")
    if not target.is_dir():
        raise CheckpointError(
            f"{name}: {run_dir.LATEST} names iteration {it}, but {target.name}/ does not exist (saved: {_saved(d)}); the "
            f"run was moved or cut short - pass an iteration that exists, or rewrite {run_dir.LATEST}")
    raise CheckpointError(f"{name}: {target.name}/ holds neither a manifest.json (a training checkpoint) nor "
                          "mp_rank_* directories (Megatron-LM); the save did not finish - pass another iteration")


def _iteration_path(d: Path, it: int | str, name: str) -> Path:
    try:
        return contained(d, run_dir.iteration_dir(".", it).name, "iteration directory")
    except UnsafePath as e:
        raise CheckpointError(f"{name}: {e}") from None


def _saved(d: Path) -> str:
    its = run_dir.saved_iterations(d)
    return ", ".join(map(str, its)) if its else "none"


def open_checkpoint(path: str | Path, *, iteration: int | str | None = None,
                    formats: Sequence[str] | None = None, tokenizer: str | Path | None = None,
                    true_vocab_size: int | None = None, allow_lora_base: bool = False) -> Checkpoint:
    """Open the checkpoint at ``path``, whatever its format (see the module docstring).

    ``iteration``: of a training run directory, the iteration to open (a number or
    ``"release"``; default: the latest complete one). ``formats``: the formats the caller
    accepts (another is refused with a hint). ``tokenizer``: a tokenizer to use instead of the
    stored one (a Meta checkpoint takes BOS/EOS from it). ``true_vocab_size``: of a Megatron-LM
    checkpoint whose args lack it. ``allow_lora_base``: open a LoRA run's training iteration
    (its model files are the frozen base weights, for resuming); otherwise a finished LoRA run
    opens as its merged ``release`` and a training iteration of one asked for is refused.
    """
    name, asked = str(path), iteration
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {name} does not exist or is not a directory; pass the directory that "
                              "holds it")
    kind = declared(d, formats)
    if kind == "tracked":
        kind, iteration = _tracked(d, name, iteration)
    elif kind == "run" and iteration is None:
        iteration = run_dir.RELEASE
    elif iteration is not None and kind != "run":
        raise CheckpointError(f"{name} is {_HINTS.get(kind, 'not a checkpoint')}, not a training run directory; an "
                              "iteration can only be chosen in a run directory (drop the iteration)")
    fmt = "native" if kind == "run" else kind
    _check_wanted(fmt, formats, name)
    if kind == "run":
        ckpt = _open_run(d, name, iteration, tokenizer)
    else:
        ckpt = _OPEN[fmt](d, name, tokenizer=tokenizer, true_vocab_size=true_vocab_size)
        if fmt == "native" and (d / run_dir.STATE).is_file():  # a training iteration named directly
            ckpt = dataclasses.replace(ckpt, state=_json_file(d / run_dir.STATE))
    if ckpt.lora_base and not allow_lora_base and asked is None and ckpt.run is not None \
            and (d / run_dir.RELEASE / MANIFEST).is_file():
        return _open_run(d, name, run_dir.RELEASE, tokenizer)  # a finished LoRA run: its merged model
    if ckpt.lora_base and not allow_lora_base:
        raise CheckpointError(
            f"{name}: this iteration of a LoRA run holds only the frozen base weights (the adapters are in its "
            "training/ directory); open the run's iteration 'release' for the merged model")
    return ckpt


def _check_wanted(fmt: str | None, formats: Sequence[str] | None, name: str) -> None:
    if fmt is not None and (formats is None or fmt in formats):
        return
    if fmt is None and (formats is None or "native" in formats):
        raise CheckpointError(
            f"{name} is not a checkpoint: it has none of manifest.json (a converted checkpoint), config.json (an HF "
            f"model), params.json (Meta) or {run_dir.LATEST} (a training run or Megatron-LM). A conversion or save that "
            "did not finish leaves no manifest; convert or save again")
    if fmt is None and "hf" in formats:
        raise CheckpointError(f"{name} has no config.json, so it is not an HF checkpoint. For Meta's format "
                              "(params.json, consolidated.*.pth) pass --checkpoint-type meta")
    if fmt is None:
        raise CheckpointError(f"{name} has no params.json, so it is not a Meta checkpoint "
                              "(for an HF checkpoint pass --checkpoint-type hf)")
    use = {"hf": "--loader llama_mistral --checkpoint-type hf", "meta": "--loader llama_mistral --checkpoint-type meta",
           "native": "--loader mcore", "megatron-lm": "--loader mcore"}[fmt]
    wanted = " or ".join(_HINTS[f] for f in formats)
    lead = (f"{name} is not a checkpoint: it has no manifest.json. It looks like an HF checkpoint"
            if fmt == "hf" and "native" in formats else f"{name} is {_HINTS[fmt]}, not {wanted}")
    raise CheckpointError(f"{lead}: convert it with `python -m services.convert {use}`.")


# ---- each format ---------------------------------------------------------------------------------

def _tokenizer_of(d: Path, override: str | Path | None) -> str | None:
    """The stored tokenizer's directory (native: the manifest's; HF / Megatron-LM: the dir or tokenizer/)."""
    if override is not None:
        return str(override)
    from shared.tokenizer import resolve_tokenizer_dir

    t = resolve_tokenizer_dir(d)
    return str(t) if any((t / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) \
        else None


def _open_native(d: Path, name: str, tokenizer=None, **_: Any) -> Checkpoint:
    from shared.checkpoint.native import load_manifest

    m = load_manifest(d)
    return Checkpoint("native", str(d), m.config, m.dtype, m.layout, _tokenizer_of(d, tokenizer), name,
                      generation=m.raw.get("generation_config"), source_config=m.source_config)


def _open_hf(d: Path, name: str, tokenizer=None, **_: Any) -> Checkpoint:
    from shared.checkpoint import hf as hf_fmt

    raw = hf_fmt.read_hf_config(d)
    try:
        cfg = ModelConfig.from_hf(raw)
    except KeyError as e:
        raise CheckpointError(f"{name}: config.json lacks {e.args[0]!r}; it is not a complete model config") from None
    weights = hf_fmt.open_hf_weights(d)
    try:
        dtype = hf_fmt.source_dtype(raw, weights)
    finally:
        weights.close()
    gen = _json_file(d / "generation_config.json") if (d / "generation_config.json").is_file() else None
    return Checkpoint("hf", str(d), cfg, dtype, Layout(), _tokenizer_of(d, tokenizer), name, generation=gen,
                      source_config=raw)


def _open_meta(d: Path, name: str, tokenizer=None, **_: Any) -> Checkpoint:
    from shared.checkpoint import meta
    from shared.checkpoint import layout as param_layout

    tok_path = str(tokenizer) if tokenizer is not None else (str(d) if (d / "tokenizer.model").is_file() else None)
    ids: dict[str, Any] = {}
    if tok_path is not None:
        from shared.tokenizer import load_source_tokenizer

        t = load_source_tokenizer(tok_path)
        ids = {"bos": t.bos_token_id, "eos": (t.eos_token_id,) if t.eos_token_id is not None else ()}
    cfg, params, src = meta.open_meta(d, vocab_size=None, **ids)
    dtype = src.dtype(param_layout.hf_names(cfg)[0])
    src.close()
    return Checkpoint("meta", str(d), cfg, dtype, Layout(), tok_path, name, source_config={"params.json": params})


def _open_megatron_lm(d: Path, name: str, tokenizer=None, true_vocab_size: int | None = None) -> Checkpoint:
    from shared.checkpoint import megatron_lm

    cfg, layout, dtype = megatron_lm.config_from_args(megatron_lm.load_rank(d, 0, 0)["args"], true_vocab_size)
    return Checkpoint("megatron-lm", str(d), cfg, dtype, layout, _tokenizer_of(d, tokenizer), name)


def _open_run(d: Path, name: str, iteration: int | str, tokenizer=None) -> Checkpoint:
    it = run_dir.check_iteration(iteration, "the iteration asked for")
    target = _iteration_path(d, it, name)
    if not (target / MANIFEST).is_file():
        raise CheckpointError(f"{name}: the run has no complete iteration {it} ({target.name}/ is "
                              f"{'incomplete' if target.exists() else 'absent'}); saved: {_saved(d)}")
    state = None
    if (target / run_dir.STATE).is_file():
        state = _json_file(target / run_dir.STATE)
    elif it != run_dir.RELEASE:
        raise CheckpointError(f"{name}: {target.name}/ lacks {run_dir.STATE}; the save did not finish - open another "
                              f"iteration (saved: {_saved(d)})")
    ckpt = _open_native(target, f"{name} ({target.name})", tokenizer)
    return dataclasses.replace(ckpt, run=str(d), iteration=it, state=state)


_OPEN = {"native": _open_native, "hf": _open_hf, "meta": _open_meta, "megatron-lm": _open_megatron_lm}
