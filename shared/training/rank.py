"""What every training process does: hold its stage and optimizer, and step, evaluate and save.

The coordinating process calls the module-level functions through a process pool; a rank's
``RankTrainer`` lives in ``process_state()`` under the run's key between calls.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.checkpoint.layout import Layout
from shared.checkpoint.native import rank_file
from shared.checkpoint.opener import Checkpoint
from shared.config import ModelConfig
from shared.model import LlamaStage, load_stage
from shared.parallel.launcher import process_state
from shared.parallel.pipeline import pipeline_forward
from shared.parallel.state import ParallelContext
from shared.specs.train import TrainConfig
from shared.training.lora import adapter_state, apply_lora, base_state
from shared.training.optim import MasterAdamW
from shared.training.schedule import one_f_one_b

TRAINING_DIR = "training"


@dataclass(frozen=True)
class RankPlan:
    """Everything a rank needs to build its part of the run (picklable)."""

    config: TrainConfig
    model: dict[str, Any]        # ModelConfig.to_dict()
    source: Checkpoint           # the weights to start from (``Checkpoint.random`` for benchmarks)
    resume_dir: str | None       # a training checkpoint whose optimizer/RNG/adapters to restore


def optim_file(t: int, p: int) -> str:
    return f"{TRAINING_DIR}/optim_tp{t}_pp{p}.safetensors"


def adapter_file(t: int, p: int) -> str:
    return f"adapter_tp{t}_pp{p}.safetensors"


def rng_file(t: int, p: int, d: int) -> str:
    return f"{TRAINING_DIR}/rng_tp{t}_pp{p}_dp{d}.pt"


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _load_local(plan: RankPlan, cfg: ModelConfig, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """This rank's fp32 state dict at the run's layout, resharded from whatever the source holds."""
    target = Layout(ctx.dims.tp, ctx.dims.pp, plan.config.make_vocab_size_divisible_by)
    return plan.source.rank_state(target, ctx.tp_rank, ctx.pp_rank, torch.float32, ctx.device)


class RankTrainer:
    def __init__(self, ctx: ParallelContext, plan: RankPlan):
        self.ctx, self.plan, self.config = ctx, plan, plan.config
        c = self.config
        self.cfg = ModelConfig.from_dict(plan.model)
        self.dtype = torch.bfloat16 if c.bf16 else torch.float32
        state = _load_local(plan, self.cfg, ctx)
        self.stage: LlamaStage = load_stage(self.cfg, ctx, state, self.dtype, c.make_vocab_size_divisible_by,
                                            recompute=c.recompute_activations)
        self.stage.train()
        if ctx.device.type == "cuda":  # fused norms, RoPE and SwiGLU, forward and backward
            from shared.model.ops import compiled_or_eager

            self.stage.ops = compiled_or_eager(ctx.device, self.dtype)
        self.tied_copy = self.cfg.tie_word_embeddings and ctx.dims.pp > 1
        for name, p in self.stage.named_parameters():
            p.tp_replicated = name.endswith("layernorm.weight")
            p.skip_in_norm = self.tied_copy and name == "output_layer.weight"  # equal to the embedding
        resume = Path(plan.resume_dir) if plan.resume_dir else None
        if c.lora:
            offset = ctx.dims.stage_layers(self.cfg.num_layers, ctx.pp_rank).start
            apply_lora(self.stage, c.lora_targets, c.lora_rank, c.lora_alpha, c.lora_dropout, c.seed, offset)
            if resume is not None:
                adapters = load_file(str(resume / TRAINING_DIR / adapter_file(ctx.tp_rank, ctx.pp_rank)))
                self.stage.load_state_dict(adapters, strict=False)
        else:
            for p in self.stage.parameters():
                p.requires_grad_(True)
        self.stage.to(ctx.device)
        trainable = [(n, p) for n, p in self.stage.named_parameters() if p.requires_grad]
        self.opt = MasterAdamW(trainable, c, initial=state)
        del state
        # dropout masks must agree across TP ranks (they act on replicated activations)
        torch.manual_seed(c.seed + 7919 * ctx.dp_rank + 104729 * ctx.pp_rank)
        if resume is not None:
            self.opt.load_state_tensors(load_file(str(resume / optim_file(ctx.tp_rank, ctx.pp_rank))))
            rng = torch.load(resume / rng_file(ctx.tp_rank, ctx.pp_rank, ctx.dp_rank), weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if rng.get("cuda") is not None and ctx.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], ctx.device)

    # ---- batches ---------------------------------------------------------------------------
    def _microbatches(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """This DP rank's slice of the global batch, cut into micro-batches."""
        per = tokens.shape[0] // self.ctx.dims.dp
        lo = self.ctx.dp_rank * per
        tokens, mask = tokens[lo: lo + per].to(self.ctx.device), mask[lo: lo + per].to(self.ctx.device)
        mbs = self.config.micro_batch_size
        return [{"ids": tokens[i: i + mbs, :-1], "labels": tokens[i: i + mbs, 1:], "mask": mask[i: i + mbs]}
                for i in range(0, per, mbs)]

    def _sync_tied_grads(self) -> None:
        """Sum the embedding's and the last stage's output-copy gradients (an all-reduce over the
        first/last-stage group, as Megatron's embedding group) so both copies stay equal."""
        if not self.tied_copy or self.ctx.embedding_group is None:
            return
        stage = self.stage
        p = stage.embedding.word_embeddings.weight if self.ctx.is_first_stage else stage.output_layer.weight
        if p.requires_grad:
            torch.distributed.all_reduce(self.opt.master_grad(p), group=self.ctx.embedding_group)

    # ---- the three operations ----------------------------------------------------------------
    def step(self, tokens: torch.Tensor, mask: torch.Tensor, n_targets: int, lr: float) -> dict[str, Any]:
        self.stage.train()
        self.opt.zero_grad()
        micro = self._microbatches(tokens, mask)
        def loss_fn(per_token: torch.Tensor, mb: dict) -> torch.Tensor:
            return (per_token * mb["mask"]).sum() / n_targets  # global mean over the batch's targets

        loss_sum = one_f_one_b(self.stage, self.ctx, micro, loss_fn, self.cfg.hidden_size, self.dtype)
        self.opt.grads_to_masters()
        self._sync_tied_grads()
        self.opt.all_reduce_grads(self.ctx.dp_group)
        norm, loss = self.opt.norm_and_loss(self.ctx, loss_sum)
        finite = math.isfinite(norm) and math.isfinite(loss)
        if finite:
            self.opt.clip(norm, self.config.clip_grad)
            self.opt.step(lr)
        self.opt.zero_grad()
        return {"loss": loss, "grad_norm": norm, "finite": finite}

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        self.stage.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # (loss sum, targets)
        for mb in self._microbatches(tokens, mask):
            out = pipeline_forward(self.stage, self.ctx, mb["ids"], labels=mb["labels"])
            if self.ctx.is_last_stage and self.ctx.tp_rank == 0:
                total += torch.stack([(out.float() * mb["mask"]).sum().double(), mb["mask"].sum().double()])
        self.stage.train()
        for group in (self.ctx.tp_group, self.ctx.pp_group, self.ctx.dp_group):
            if group is not None and torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(total, group=group)
        return {"loss_sum": float(total[0]), "targets": float(total[1])}

    def save(self, directory: str, export: bool = False, adapters_dir: str | None = None) -> None:
        """Training checkpoint files (``export``: only merged model weights) into ``directory``."""
        ctx, d = self.ctx, Path(directory)
        t, p = ctx.tp_rank, ctx.pp_rank
        if ctx.dp_rank == 0:
            weights = base_state(self.stage, merge=export and self.config.lora)
            if self.tied_copy:
                weights.pop("output_layer.weight", None)  # stored once, as stage 0's embedding
            _save({k: v.to(self.dtype) for k, v in weights.items()}, d / rank_file(t, p))
            if adapters_dir is not None:
                _save(adapter_state(self.stage), Path(adapters_dir) / adapter_file(t, p))
            if not export:
                _save(self.opt.state_tensors(), d / optim_file(t, p))
                if self.config.lora:
                    _save(adapter_state(self.stage), d / TRAINING_DIR / adapter_file(t, p))
        if not export:
            cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
            torch.save({"cpu": torch.get_rng_state(), "cuda": cuda}, d / rng_file(t, p, ctx.dp_rank))


# ---- entry points run on every rank ----------------------------------------------------------

def rank_memory(ctx: ParallelContext, key: str) -> tuple[int, int] | None:
    """(free, total) bytes of this rank's GPU before anything is loaded; None on CPU."""
    if ctx.device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(ctx.device)


def rank_setup(ctx: ParallelContext, key: str, plan: RankPlan) -> dict[str, Any]:
    process_state()[key] = RankTrainer(ctx, plan)
    trainer = process_state()[key]

    def counted(p) -> bool:  # each distinct parameter once across TP, PP and DP
        copy = getattr(p, "skip_in_norm", False) or (getattr(p, "tp_replicated", False) and ctx.tp_rank > 0)
        return not copy and ctx.dp_rank == 0

    return {"trainable": sum(p.numel() for p in trainer.opt.params if counted(p)),
            "parameters": sum(p.numel() for p in trainer.stage.parameters() if counted(p))}


def rank_step(ctx: ParallelContext, key: str, tokens, mask, n_targets: int, lr: float) -> dict[str, Any]:
    return process_state()[key].step(tokens, mask, n_targets, lr)


def rank_evaluate(ctx: ParallelContext, key: str, tokens, mask) -> dict[str, float]:
    return process_state()[key].evaluate(tokens, mask)


def rank_save(ctx: ParallelContext, key: str, directory: str, export: bool = False,
              adapters_dir: str | None = None) -> None:
    process_state()[key].save(directory, export, adapters_dir)


def rank_teardown(ctx: ParallelContext, key: str) -> None:
    process_state().pop(key, None)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
