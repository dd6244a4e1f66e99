"""Megatron-LM's ``--ckpt-format torch`` layout, with megatron-core parameter names.

    <dir>/latest_checkpointed_iteration.txt          "1"
    <dir>/iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": 1, "model": {...}}

``transformer_impl="local"`` uses the local layer spec's names; ``"transformer_engine"`` the
TE spec's, where each norm is fused into the following linear (``layer_norm_weight``). Both
carry the ``_extra_state`` entries megatron-core expects beside every linear layer.
Reading unpickles nothing but ``argparse.Namespace`` beside tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch

from shared.specs.convert import TRANSFORMER_IMPLS
from shared.config import ModelConfig, RopeScaling
from shared.checkpoint import layout as param_layout
from shared.checkpoint.layout import Layout
from shared.checkpoint.native import ShardedSource
from shared.checkpoint.run import LATEST, iteration_dir, read_tracker
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import TensorSource
from shared.dtypes import dtype_name
from shared.paths import UnsafePath, contained

TRACKER = LATEST
CHECKPOINT_VERSION = 3.0
ITERATION = 1
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
# TE fuses each pre-norm into the linear after it
_TE_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def megatron_args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, transformer_impl: str = "local"
                  ) -> argparse.Namespace:
    """The Megatron-LM arguments that describe this model (names as Megatron-LM checks them)."""
    s = cfg.rope_scaling
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads, num_query_groups=cfg.num_kv_heads,
        group_query_attention=cfg.num_kv_heads != cfg.num_heads, kv_channels=cfg.head_dim,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        make_vocab_size_divisible_by=layout.divisible_by, padded_vocab_size=layout.padded_vocab(cfg),
        vocab_size=cfg.vocab_size, true_vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="rope", rotary_base=cfg.rope_theta, rotary_percent=1.0,
        use_rope_scaling=s is not None and s.kind == "llama3", rope_scaling_factor=s.factor if s else 1.0,
        rope_scaling_kind=s.kind if s else None,
        rope_scaling_low_freq_factor=s.low_freq_factor if s else None,
        rope_scaling_high_freq_factor=s.high_freq_factor if s else None,
        rope_scaling_original_max_position_embeddings=s.original_max_position_embeddings if s else None,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, swiglu=True,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        add_bias_linear=False, add_qkv_bias=cfg.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        transformer_impl=transformer_impl, use_mcore_models=True, model_type_hf=cfg.model_type,
        bos_token_id=cfg.bos_token_id, eos_token_ids=list(cfg.eos_token_ids),
        tokenizer_type="HuggingFaceTokenizer", iteration=ITERATION, consumed_train_samples=0,
    )


def to_megatron_names(local: dict[str, torch.Tensor], transformer_impl: str) -> dict[str, Any]:
    """Our local names -> the names megatron-core's GPTModel uses, with ``_extra_state`` entries."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise CheckpointError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
    out: dict[str, Any] = {}
    for name, t in local.items():
        if transformer_impl == "transformer_engine" and name.startswith("decoder.layers."):
            prefix, _, tail = _split_layer(name)
            if tail in _TE_NORMS:
                name = prefix + _TE_NORMS[tail]
        out[name] = t
        for lin in _LINEARS:
            if name.endswith(f".{lin}.weight"):
                out[name[: -len("weight")] + "_extra_state"] = None
        if name == "output_layer.weight":
            out["output_layer._extra_state"] = None
    return out


def _split_layer(name: str) -> tuple[str, str, str]:
    """'decoder.layers.3.input_layernorm.weight' -> ('decoder.layers.3.', '', 'input_layernorm.weight')."""
    parts = name.split(".")
    return ".".join(parts[:3]) + ".", "", ".".join(parts[3:])


def from_megatron_names(model: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_megatron_names`` (either implementation's names)."""
    back = {v: k for k, v in _TE_NORMS.items()}
    out = {}
    for name, t in model.items():
        if name.endswith("_extra_state") or t is None:
            continue
        if name.startswith("decoder.layers."):
            prefix, _, tail = _split_layer(name)
            name = prefix + back.get(tail, tail)
        out[name] = t
    return out


def write_megatron_lm(directory: Path, cfg: ModelConfig, layout: Layout, source: TensorSource,
                     dtype: torch.dtype, transformer_impl: str = "local",
                     on_tensor: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Write every rank's ``model_optim_rng.pt``; one pipeline stage's tensors are held at a time."""
    layout.check(cfg)
    directory = Path(directory)
    it_dir = directory / f"iter_{ITERATION:07d}"
    args = megatron_args(cfg, layout, dtype, transformer_impl)
    files = []
    specs = param_layout.param_specs(cfg, layout)
    for p in range(layout.pp):
        ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(layout.tp)]
        for spec in specs:
            if spec.pp_rank(cfg, layout) != p:
                continue
            hf = [param_layout.trim_vocab(spec, source.get(n), cfg) for n in spec.hf_names]
            for t, piece in enumerate(param_layout.shard(spec, hf, cfg, layout)):
                ranks[t][spec.local_name(cfg, layout)] = piece.to(dtype).clone()
            if on_tensor:
                on_tensor(spec.name, sum(torch.Size(param_layout.hf_shape(cfg, n)).numel() for n in spec.hf_names)
                          * torch.empty((), dtype=dtype).element_size())
        for t, local in enumerate(ranks):
            out = it_dir / rank_dir(t, p, layout.pp) / "model_optim_rng.pt"
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": ITERATION,
                        "model": to_megatron_names(local, transformer_impl)}, out)
            files.append(str(out.relative_to(directory)))
        del ranks
    (directory / TRACKER).write_text(str(ITERATION))
    return {"format": "megatron-lm-torch", "directory": str(directory), "files": files,
            "dtype": dtype_name(dtype), "transformer_impl": transformer_impl, "model": cfg.to_dict(),
            "layout": {"tp": layout.tp, "pp": layout.pp, "divisible_by": layout.divisible_by,
                       "padded_vocab_size": layout.padded_vocab(cfg)}}


# ---- reading --------------------------------------------------------------------------------

def is_megatron_lm(directory: Path) -> bool:
    return (Path(directory) / TRACKER).is_file()


def _iteration_dir(directory: Path) -> Path:
    if not (Path(directory) / TRACKER).is_file():
        raise CheckpointError(f"{directory} has no {TRACKER}; it is not a Megatron-LM checkpoint")
    return iteration_dir(directory, read_tracker(directory))


def load_rank(directory: str | Path, tp_rank: int, pp_rank: int, pp: int | None = None) -> dict[str, Any]:
    """One rank's ``model_optim_rng.pt``, unpickling only tensors and ``argparse.Namespace``."""
    it_dir = _iteration_dir(Path(directory))
    candidates = [it_dir / rank_dir(tp_rank, pp_rank, 1 if pp == 1 else 2) / "model_optim_rng.pt"]
    if pp is None:
        candidates.insert(0, it_dir / rank_dir(tp_rank, pp_rank, 1) / "model_optim_rng.pt")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise CheckpointError(f"{it_dir}: no model_optim_rng.pt for tp rank {tp_rank}, pp rank {pp_rank}")
    path = _inside(Path(directory), path)
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle ({str(e).splitlines()[0]}); only tensors and argparse.Namespace "
            "are accepted from a Megatron-LM checkpoint") from e
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        raise CheckpointError(f"{path}: expected a dict with 'args' and 'model'")
    return state


def config_from_args(args: argparse.Namespace, true_vocab_size: int | None = None) -> tuple[ModelConfig, Layout, torch.dtype]:
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    vocab = true_vocab_size or g("true_vocab_size") or g("vocab_size")
    if not vocab:
        raise CheckpointError("the checkpoint's args do not record the true vocabulary size; pass --true-vocab-size")
    if g("normalization", "LayerNorm") != "RMSNorm" or not g("swiglu", False):
        raise CheckpointError("only RMSNorm + SwiGLU (Llama-family) Megatron checkpoints are supported")
    scaling = None
    kind = g("rope_scaling_kind") or ("llama3" if g("use_rope_scaling") else None)
    if kind:
        scaling = RopeScaling(kind, float(g("rope_scaling_factor", 8.0)),
                              float(g("rope_scaling_low_freq_factor") or 1.0),
                              float(g("rope_scaling_high_freq_factor") or 4.0),
                              int(g("rope_scaling_original_max_position_embeddings") or 8192))
    heads = int(args.num_attention_heads)
    cfg = ModelConfig(
        vocab_size=int(vocab), hidden_size=int(args.hidden_size), intermediate_size=int(args.ffn_hidden_size),
        num_layers=int(args.num_layers), num_heads=heads,
        num_kv_heads=int(g("num_query_groups") or heads) if g("group_query_attention", True) else heads,
        head_dim=int(g("kv_channels") or args.hidden_size // heads), rms_norm_eps=float(g("norm_epsilon", 1e-5)),
        rope_theta=float(g("rotary_base", 10000)), rope_scaling=scaling,
        max_position_embeddings=int(args.max_position_embeddings),
        tie_word_embeddings=not g("untie_embeddings_and_output_weights", False), qkv_bias=bool(g("add_qkv_bias", False)),
        model_type=g("model_type_hf", "llama"), bos_token_id=g("bos_token_id"), eos_token_ids=tuple(g("eos_token_ids") or ()),
    )
    layout = Layout(tp=int(args.tensor_model_parallel_size), pp=int(g("pipeline_model_parallel_size", 1)),
                    divisible_by=int(g("make_vocab_size_divisible_by", 128)))
    if g("padded_vocab_size") and int(args.padded_vocab_size) != layout.padded_vocab(cfg):
        raise CheckpointError(
            f"padded_vocab_size {args.padded_vocab_size} does not follow from vocab {cfg.vocab_size}, TP {layout.tp} "
            f"and divisible-by {layout.divisible_by}; pass the right --true-vocab-size")
    dtype = g("params_dtype") if isinstance(g("params_dtype"), torch.dtype) else (
        torch.bfloat16 if g("bf16") else torch.float16 if g("fp16") else torch.float32)
    return cfg, layout, dtype


def open_megatron_lm(directory: Path, true_vocab_size: int | None = None
                     ) -> tuple[ModelConfig, Layout, torch.dtype, argparse.Namespace, ShardedSource]:
    first = load_rank(directory, 0, 0)
    cfg, layout, dtype = config_from_args(first["args"], true_vocab_size)
    cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def get_local(t: int, p: int, name: str) -> torch.Tensor:
        if (t, p) not in cache:
            if len(cache) >= 2 * layout.tp:  # keep about one stage of mmap handles
                cache.pop(next(iter(cache)))
            cache[(t, p)] = from_megatron_names(load_rank(directory, t, p, layout.pp)["model"])
        try:
            return cache[(t, p)][name]
        except KeyError:
            raise CheckpointError(f"{directory}: rank tp={t} pp={p} lacks {name}") from None

    return cfg, layout, dtype, first["args"], ShardedSource(cfg, layout, dtype, get_local)


def files(directory: Path) -> list[Path]:
    return sorted(_inside(Path(directory), p) for p in Path(directory).rglob("model_optim_rng.pt"))


def _inside(directory: Path, path: Path) -> Path:
    try:
        return contained(directory, path.relative_to(directory).as_posix(), "rank file")
    except UnsafePath as e:
        raise CheckpointError(str(e)) from None

