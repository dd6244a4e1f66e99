"""megatron-core's GPTModel as an independent oracle for the Megatron-LM torch layout.

Runs on CPU over gloo after three test-side patches (CUDA device query, causal mask, RNG
tracker fork); see the README's notes on megatron-core.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F


def _patch() -> None:
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as mutils

    torch.cuda.current_device = lambda: torch.device("cpu")

    def cpu_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    mutils.get_default_causal_mask = cpu_mask
    for mod in list(__import__("sys").modules.values()):
        if mod is not None and getattr(mod, "get_default_causal_mask", None) is not None and mod.__name__.startswith("megatron"):
            mod.get_default_causal_mask = cpu_mask

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()


def build_gpt(args, tp: int) -> torch.nn.Module:
    """A megatron-core GPTModel configured from a Megatron-LM ``args`` namespace."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization="RMSNorm", layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        params_dtype=torch.float32,
    )
    return GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(args.rotary_base),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rope_scaling=bool(args.use_rope_scaling), rope_scaling_factor=float(getattr(args, "rope_scaling_factor", 8.0)),
    )


def run_rank(rank: int, world: int, port: int, ckpt_dir: str, input_ids: list[list[int]], out: str) -> None:
    """Load the torch-layout checkpoint strictly into GPTModel at TP=world and save logits (rank 0)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    _patch()
    from shared.checkpoint.megatron_lm import load_rank

    state = load_rank(ckpt_dir, tp_rank=rank, pp_rank=0)
    model = build_gpt(state["args"], world)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    ids = torch.tensor(input_ids)
    s = ids.shape[1]
    pos = torch.arange(s).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model(ids, pos, mask)  # (B, S, Vp/T) on each rank
        logits = gather_from_tensor_model_parallel_region(logits)
    if rank == 0:
        torch.save({"logits": logits, "keys": sorted(model.state_dict().keys())}, out)
    torch.distributed.destroy_process_group()
