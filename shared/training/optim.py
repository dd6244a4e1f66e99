"""AdamW over fp32 master weights, Megatron's LR schedule, and the global gradient norm across TP/PP."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from shared.parallel.state import ParallelContext
from shared.specs.train import TrainConfig


def learning_rate(iteration: int, cfg: TrainConfig) -> float:
    """LR of 0-based ``iteration``: linear warmup to ``lr``, then decay to ``min_lr`` over the decay iters."""
    step = iteration + 1
    if cfg.lr_warmup_iters and step <= cfg.lr_warmup_iters:
        return cfg.lr * step / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if step > cfg.decay_iters:
        return cfg.min_lr
    span = cfg.decay_iters - cfg.lr_warmup_iters
    ratio = (step - cfg.lr_warmup_iters) / span if span > 0 else 1.0
    coeff = 1.0 - ratio if cfg.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def _into_main_grad(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


def _all_reduce(t: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


class MasterAdamW:
    """AdamW whose state and weights are fp32 masters of the (possibly bf16) model parameters.

    Norms and biases get no weight decay (Megatron's rule). A parameter marked
    ``tp_replicated`` holds the same values on every TP rank: its gradient is counted once in
    the global norm. ``skip_in_norm`` marks the last stage's copy of a tied embedding.

    A low-precision parameter's gradient accumulates in fp32 across micro-batches (Megatron's
    ``main_grad``): after each backward adds into its bf16 ``.grad``, a hook moves that into
    the parameter's fp32 ``main_grad`` and frees it, so no bf16 sum is ever rounded again.
    """

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig,
                 initial: dict[str, torch.Tensor] | None = None):
        """``initial``: fp32 values for the masters of low-precision parameters (else upcast copies)."""
        self.names, self.params, self.masters = [], [], []
        decay, no_decay = [], []
        initial = initial or {}
        for name, p in named:
            if p.dtype == torch.float32:
                master = p
            else:
                src = initial.get(name, p.detach())
                master = nn.Parameter(src.to(device=p.device, dtype=torch.float32).clone())
                p.main_grad = torch.zeros_like(master, memory_format=torch.contiguous_format)
                p.register_post_accumulate_grad_hook(_into_main_grad)
            self.names.append(name)
            self.params.append(p)
            self.masters.append(master)
            (decay if p.ndim >= 2 else no_decay).append(master)
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)

    @property
    def mixed(self) -> bool:
        return any(p is not m for p, m in zip(self.params, self.masters))

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None
            if m is not p:
                p.main_grad.zero_()

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                if p.grad is not None:  # a gradient the hook did not see (set by hand)
                    _into_main_grad(p)
                m.grad = p.main_grad
            else:
                p.grad = p.grad if p.grad is not None else torch.zeros_like(p)

    def master_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The fp32 gradient the optimizer will use for ``param`` (after ``grads_to_masters``)."""
        for p, m in zip(self.params, self.masters):
            if p is param:
                return m.grad
        raise KeyError("not a parameter of this optimizer")

    def all_reduce_grads(self, group) -> None:
        """Sum master gradients over data-parallel replicas (the loss is normalized globally)."""
        if group is None or dist.get_world_size(group) == 1:
            return
        grads = [m.grad for m in self.masters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def norm_and_loss(self, ctx: ParallelContext, loss_sum: float) -> tuple[float, float]:
        """(global grad norm, global loss sum): squares summed over TP, PP (and loss over DP)."""
        grads = [m.grad for p, m in zip(self.params, self.masters)
                 if not (getattr(p, "skip_in_norm", False) or (getattr(p, "tp_replicated", False) and ctx.tp_rank))]
        sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
        if grads:
            sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        on_loss_rank = ctx.is_last_stage and ctx.tp_rank == 0
        vec = torch.stack([sq if ctx.dp_rank == 0 else torch.zeros_like(sq),
                           torch.tensor(loss_sum if on_loss_rank else 0.0, dtype=torch.float32, device=ctx.device)])
        for group in (ctx.tp_group, ctx.pp_group, ctx.dp_group):
            _all_reduce(vec, group)
        return float(vec[0].sqrt()), float(vec[1])

    def clip(self, norm: float, max_norm: float) -> None:
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_([m.grad for m in self.masters], max_norm / (norm + 1e-6))

    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    if m is not p:
                        p.copy_(m)

    # ---- state as named tensors (for safetensors) ------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p, m in zip(self.names, self.params, self.masters):
            if m is not p:
                out[f"{name}/master"] = m.detach()
            st = self.opt.state.get(m)
            if st:
                out[f"{name}/exp_avg"] = st["exp_avg"]
                out[f"{name}/exp_avg_sq"] = st["exp_avg_sq"]
                out[f"{name}/step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        expected = set()
        for name, p, m in zip(self.names, self.params, self.masters):
            if m is not p:
                expected.add(f"{name}/master")
            if f"{name}/step" in state:
                expected.update(f"{name}/{k}" for k in ("exp_avg", "exp_avg_sq", "step"))
        missing = sorted(expected - set(state))
        extra = sorted(k for k in set(state) - expected if not k.endswith("/master"))
        if missing or extra:
            raise ValueError(f"optimizer state does not match the model (missing {missing[:4]}, "
                             f"unexpected {extra[:4]}); resume with the same model, TP/PP and finetune method")
        with torch.no_grad():
            for name, p, m in zip(self.names, self.params, self.masters):
                if m is not p:
                    m.copy_(state[f"{name}/master"])
                    p.copy_(m)
                if f"{name}/step" in state:
                    self.opt.state[m] = {"step": state[f"{name}/step"].reshape(()).clone().cpu(),
                                         "exp_avg": state[f"{name}/exp_avg"].to(m.device).clone(),
                                         "exp_avg_sq": state[f"{name}/exp_avg_sq"].to(m.device).clone()}
