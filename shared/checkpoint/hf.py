"""HF checkpoints: reading (config.json + weights) and exporting (sharded safetensors + index).

The export streams: the shard plan is computed from the config's shapes, every shard file is
laid out up front and tensors are written as they are produced, so a full model is never held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from shared.config import ModelConfig
from shared.checkpoint import layout as param_layout
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import TensorSource, open_hf_weights
from shared.checkpoint.writer import StreamingSafetensorsWriter
from shared.dtypes import dtype_name
from shared.paths import UnsafePath, check_tree, contained

HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_SHARD_BYTES = 2 << 30


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{directory} has no config.json, so it is not an HF checkpoint. For Meta's format "
            "(params.json, consolidated.*.pth) pass --checkpoint-type meta")
    try:
        raw = json.loads(contained(directory, "config.json").read_text())
    except UnsafePath as e:
        raise CheckpointError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"config.json is not valid JSON ({type(e).__name__}); re-export the model config") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json holds a JSON {type(raw).__name__}, not an object of model settings")
    return raw


def check_hf_dir(directory: Path) -> None:
    """Before transformers opens an HF directory by itself: no link leads out of it and every
    shard an index names lies inside it (transformers would follow an absolute index entry)."""
    try:
        check_tree(directory)
    except UnsafePath as e:
        raise CheckpointError(str(e)) from None
    open_hf_weights(Path(directory)).close()


def check_hf_shapes(source: TensorSource, cfg: ModelConfig) -> None:
    """Every tensor ``cfg`` needs is present with the shape the config implies."""
    problems = []
    for name in param_layout.hf_names(cfg):
        if name not in source:
            problems.append(f"{name} is missing")
            continue
        want, got = param_layout.hf_shape(cfg, name), source.shape(name)
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            if got[1:] != want[1:] or got[0] < want[0]:
                problems.append(f"{name} has shape {list(got)}, config implies {list(want)}")
        elif got != want:
            problems.append(f"{name} has shape {list(got)}, config implies {list(want)}")
    known = set(param_layout.hf_names(cfg)) | {"lm_head.weight"}  # a tied model may still store its lm_head copy
    extra = [n for n in source.names() if n not in known and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        problems.append(f"the weights hold tensors this architecture does not have ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}); converting would silently drop them")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"config and weights disagree: {shown}. Check that config.json belongs to these weights")


def source_dtype(raw: Mapping[str, Any], source: TensorSource) -> torch.dtype:
    """The dtype of the weights as stored (config's torch_dtype may disagree; the files win)."""
    names = [n for n in source.names() if n.endswith("weight")]
    return source.dtype(names[0]) if names else torch.float32


def open_hf(directory: Path, vocab_size: int | None = None) -> tuple[ModelConfig, dict[str, Any], TensorSource]:
    raw = read_hf_config(directory)
    cfg = ModelConfig.from_hf(raw, vocab_size=vocab_size)
    return cfg, raw, open_hf_weights(directory)


def generation_config(cfg: ModelConfig, source_dir: Path | None = None) -> dict[str, Any]:
    if source_dir is not None and (Path(source_dir) / "generation_config.json").exists():
        return json.loads((Path(source_dir) / "generation_config.json").read_text())
    out: dict[str, Any] = {"bos_token_id": cfg.bos_token_id}
    if cfg.eos_token_ids:
        out["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return out


def shard_plan(cfg: ModelConfig, dtype: torch.dtype, max_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[str]]:
    """HF tensor names grouped into files of at most ``max_bytes`` (a lone larger tensor gets its own)."""
    size = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    used = 0
    for name in param_layout.hf_names(cfg):
        n = torch.Size(param_layout.hf_shape(cfg, name)).numel() * size
        if plan[-1] and used + n > max_bytes:
            plan.append([])
            used = 0
        plan[-1].append(name)
        used += n
    return plan


def write_hf(directory: Path, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
             *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, generation: Mapping[str, Any] | None = None,
             on_tensor: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Write an HF checkpoint of ``cfg`` from (name, tensor) pairs arriving in ``hf_names`` order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(cfg, dtype, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    file_of = {n: i for i, names in enumerate(plan) for n in names}
    writers: dict[int, StreamingSafetensorsWriter] = {}
    total = 0
    try:
        for name, t in tensors:
            i = file_of.get(name)
            if i is None:
                raise CheckpointError(f"unexpected tensor {name!r} for this architecture")
            if i not in writers:
                writers[i] = StreamingSafetensorsWriter(
                    directory / files[i], [(n, param_layout.hf_shape(cfg, n), dtype) for n in plan[i]], {"format": "pt"})
            t = t.to(dtype).contiguous()
            writers[i].add(name, t)
            total += t.numel() * t.element_size()
            if on_tensor:
                on_tensor(name, t.numel() * t.element_size())
            if writers[i].complete:
                writers[i].close()
        missing = [files[i] for i in range(len(plan)) if i not in writers or not writers[i].complete]
        if missing:
            raise CheckpointError(f"HF export incomplete: {missing} did not receive all tensors")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    index = {"metadata": {"total_size": total}, "weight_map": {n: files[file_of[n]] for n in file_of}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(cfg.to_hf(HF_DTYPE_NAMES[dtype]), indent=2))
    (directory / "generation_config.json").write_text(json.dumps(dict(generation or generation_config(cfg)), indent=2))
    return {"format": "hf", "directory": str(directory), "files": files + ["model.safetensors.index.json"],
            "dtype": dtype_name(dtype), "total_bytes": total, "model": cfg.to_dict()}

