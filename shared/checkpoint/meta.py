"""Meta's native Llama format: ``params.json``, ``consolidated.NN.pth`` shards, ``tokenizer.model``.

Read as HF-named tensors, one parameter at a time: the model-parallel shards are joined in
memory and q/k rows are permuted from Meta's interleaved-pair RoPE order to HF's rotate-half
order. ``write_meta`` is the exact inverse (used to build test checkpoints).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from shared.config import ModelConfig, RopeScaling
from shared.checkpoint import layout as param_layout
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import safe_torch_load, TensorSource
from shared.paths import UnsafePath, contained

# HF name pattern -> (Meta name pattern, dim the shards join on; None = replicated)
_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight", 1),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "output.weight", 0),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{}.attention.wq.weight", 0),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{}.attention.wk.weight", 0),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{}.attention.wv.weight", 0),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{}.attention.wo.weight", 1),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{}.feed_forward.w1.weight", 0),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{}.feed_forward.w3.weight", 0),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.feed_forward.w2.weight", 1),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attention_norm.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.ffn_norm.weight", None),
]


def meta_name(hf_name: str) -> tuple[str, int | None]:
    for pattern, meta, dim in _NAMES:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return meta.format(*m.groups()), dim
    raise CheckpointError(f"no Meta equivalent for {hf_name!r}")


# Meta q/k rows: per head, pairs (x0,x1),(x2,x3)...; HF: first halves then second halves.
def meta_to_hf_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, h = w.shape
    d = rows // heads
    return w.view(heads, d // 2, 2, h).transpose(1, 2).reshape(rows, h)


def hf_to_meta_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, h = w.shape
    d = rows // heads
    return w.view(heads, 2, d // 2, h).transpose(1, 2).reshape(rows, h)


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def shard_files(directory: Path) -> list[Path]:
    try:
        files = [contained(directory, p.name, "Meta shard") for p in sorted(Path(directory).glob("consolidated.*.pth"))]
    except UnsafePath as e:
        raise CheckpointError(str(e)) from None
    if not files:
        raise CheckpointError(f"{directory}: no consolidated.NN.pth files; is this a Meta checkpoint?")
    numbers = [int(p.name.split(".")[1]) if p.name.split(".")[1].isdigit() else -1 for p in files]
    if numbers != list(range(len(files))):
        raise CheckpointError(f"{directory}: consolidated shards {numbers} are not numbered 00..{len(files) - 1:02d}; "
                              "a shard is missing")
    return files


def read_params(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "params.json"
    if path.exists():
        try:
            path = contained(directory, "params.json", "Meta params")
        except UnsafePath as e:
            raise CheckpointError(str(e)) from None
    if not path.exists():
        raise CheckpointError(f"{directory} has no params.json, so it is not a Meta checkpoint "
                              "(for an HF checkpoint pass --checkpoint-type hf)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__})") from None


def config_from_params(params: Mapping[str, Any], vocab_size: int, bos: int | None = 1,
                       eos: tuple[int, ...] = (2,)) -> ModelConfig:
    for moe in ("moe", "n_experts", "num_experts"):
        if params.get(moe):
            from shared.config import UnsupportedModelError
            raise UnsupportedModelError(f"params.json has {moe}: mixture-of-experts models are not supported")
    dim, heads = int(params["dim"]), int(params["n_heads"])
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = RopeScaling("llama3", factor=float(params.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192)
    theta = float(params.get("rope_theta", 10000.0))
    max_pos = int(params.get("max_seq_len") or (131072 if scaling else 8192 if theta >= 5e5 else 4096))
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=dim,
        intermediate_size=ffn_size(dim, int(params["multiple_of"]), params.get("ffn_dim_multiplier")),
        num_layers=int(params["n_layers"]), num_heads=heads, num_kv_heads=int(params.get("n_kv_heads") or heads),
        head_dim=dim // heads, rms_norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=max_pos, tie_word_embeddings=False, model_type="llama",
        bos_token_id=bos, eos_token_ids=eos,
    )


class MetaSource(TensorSource):
    """HF-named tensors of a Meta checkpoint, each joined from the shards when asked for."""

    def __init__(self, directory: Path, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._paths = shard_files(directory)
        self._loaded: list[dict] | None = None
        for name in param_layout.hf_names(cfg):
            meta, _ = meta_name(name)
            if meta not in self._shards[0]:
                continue  # reported by check_hf_shapes as missing
            self._shapes[name] = self._joined_shape(name)
            self._dtypes[name] = self._shards[0][meta].dtype

    @property
    def _shards(self) -> list[dict]:
        """The shards' state dicts, memory-mapped; loaded again after ``release``."""
        if self._loaded is None:
            self._loaded = []
            for p in self._paths:
                sd = safe_torch_load(p)
                if not isinstance(sd, dict):
                    raise CheckpointError(f"{p}: expected a state dict, found {type(sd).__name__}")
                self._loaded.append(sd)
        return self._loaded

    def release(self) -> None:
        """Drop the maps, so the pages read so far stop counting against this process."""
        self._loaded = None

    def _join_dim(self, name: str, shapes: list[tuple[int, ...]]) -> int | None:
        """The dim the shards of ``name`` are joined on (None: replicated or a single shard)."""
        _, dim = meta_name(name)
        if dim is None or len(shapes) == 1:
            return None
        if name == "model.embed_tokens.weight" and sum(s[1] for s in shapes) != self.cfg.hidden_size:
            return 0  # Llama-3 shards the embedding by rows
        return dim

    def _joined_shape(self, name: str) -> tuple[int, ...]:
        meta, _ = meta_name(name)
        shapes = []
        for i, sd in enumerate(self._shards):
            if meta not in sd:
                raise CheckpointError(f"{self._paths[i].name} lacks {meta}; the shard is incomplete")
            shapes.append(tuple(sd[meta].shape))
        dim = self._join_dim(name, shapes)
        if dim is None:
            return shapes[0]
        out = list(shapes[0])
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out)

    def get(self, name: str) -> torch.Tensor:
        meta, _ = meta_name(name)
        parts = [sd[meta] for sd in self._shards]
        dim = self._join_dim(name, [tuple(p.shape) for p in parts])
        w = parts[0] if dim is None else torch.cat(parts, dim=dim)
        if name.endswith("q_proj.weight"):
            w = meta_to_hf_qk(w, self.cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = meta_to_hf_qk(w, self.cfg.num_kv_heads)
        return w

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) joined from the shards' pieces of them only (the whole tensor is never built)."""
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return self.get(name)[lo:hi]  # permuted within heads: whole rows of the join
        meta, _ = meta_name(name)
        parts = [sd[meta] for sd in self._shards]
        dim = self._join_dim(name, [tuple(p.shape) for p in parts])
        if dim is None:
            return parts[0][lo:hi]
        if dim != 0:
            return torch.cat([p[lo:hi] for p in parts], dim=dim)
        pieces, offset = [], 0
        for p in parts:
            a, b = max(lo, offset), min(hi, offset + p.shape[0])
            if a < b:
                pieces.append(p[a - offset:b - offset])
            offset += p.shape[0]
        return torch.cat(pieces)

    def files(self) -> list[Path]:
        return list(self._paths)


def open_meta(directory: Path, vocab_size: int | None = None, bos: int | None = 1,
              eos: tuple[int, ...] = (2,)) -> tuple[ModelConfig, dict[str, Any], MetaSource]:
    params = read_params(directory)
    v = vocab_size or int(params.get("vocab_size", -1))
    if v <= 0:
        first = safe_torch_load(shard_files(directory)[0])
        emb = first.get("tok_embeddings.weight") if isinstance(first, dict) else None
        if emb is None:
            raise CheckpointError(f"{directory}: cannot tell the vocabulary size (params.json vocab_size is "
                                  f"{params.get('vocab_size')} and there is no tok_embeddings.weight)")
        v = emb.shape[0]
    cfg = config_from_params(params, v, bos, eos)
    return cfg, params, MetaSource(Path(directory), cfg)


def write_meta(directory: Path, hf: Mapping[str, torch.Tensor], cfg: ModelConfig, num_shards: int,
               multiple_of: int, ffn_dim_multiplier: float | None = None) -> None:
    """Write ``hf`` (an HF Llama state dict) in Meta's format with ``num_shards`` model-parallel files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if ffn_size(cfg.hidden_size, multiple_of, ffn_dim_multiplier) != cfg.intermediate_size:
        raise ValueError("multiple_of / ffn_dim_multiplier do not reproduce intermediate_size")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name in param_layout.hf_names(cfg):
        meta, dim = meta_name(name)
        w = hf[name]
        if name.endswith("q_proj.weight"):
            w = hf_to_meta_qk(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = hf_to_meta_qk(w, cfg.num_kv_heads)
        pieces = [w] * num_shards if dim is None else torch.chunk(w, num_shards, dim=dim)
        for sd, piece in zip(shards, pieces):
            sd[meta] = piece.clone().contiguous()
    for i, sd in enumerate(shards):
        torch.save(sd, directory / f"consolidated.{i:02d}.pth")
    params = {"dim": cfg.hidden_size, "multiple_of": multiple_of, "n_heads": cfg.num_heads,
              "n_layers": cfg.num_layers, "norm_eps": cfg.rms_norm_eps, "vocab_size": -1,
              "rope_theta": cfg.rope_theta}
    if cfg.num_kv_heads != cfg.num_heads:
        params["n_kv_heads"] = cfg.num_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    (directory / "params.json").write_text(json.dumps(params))
