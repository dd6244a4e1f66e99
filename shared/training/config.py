"""Everything one training run needs, as one validated, picklable description (Megatron's flag names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DECAY_STYLES = ("cosine", "linear", "constant")
FINETUNE_METHODS = ("full", "lora")
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
OVERLONG = ("truncate", "drop")


class ConfigError(ValueError):
    """A training option that cannot work; the message names the flag and the fix."""


@dataclass(frozen=True)
class TrainConfig:
    load: str                                 # native checkpoint, HF dir, or a training run / iteration dir
    save: str                                 # run directory (training checkpoints, final exports)
    data_path: tuple[str, ...]                # JSONL files
    train_iters: int
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 512
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None         # default: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    clip_grad: float = 1.0                    # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 1234
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    world_size: int | None = None             # default: TP * PP (data parallel 1)
    bf16: bool = False
    save_interval: int | None = None
    eval_interval: int | None = None
    eval_iters: int = 10
    valid_data_path: tuple[str, ...] = ()     # default: hold out ``valid_fraction`` of the samples
    valid_fraction: float = 0.0
    overlong: str = "truncate"
    recompute_activations: bool = False
    metrics_file: str | None = None
    finetune: bool = False                    # from a training checkpoint: weights only, iteration 0
    exit_interval: int | None = None          # stop (after saving) once this iteration is reached
    finetune_method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    export_hf: bool = True
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        for name in ("data_path", "valid_data_path", "lora_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
        self.check()

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def dp(self) -> int:
        return (self.world_size or self.tp * self.pp) // (self.tp * self.pp)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    @property
    def lora(self) -> bool:
        return self.finetune_method == "lora"

    def check(self) -> None:
        p: list[str] = []
        positive = ("train_iters", "micro_batch_size", "global_batch_size", "seq_length",
                    "tensor_model_parallel_size", "pipeline_model_parallel_size", "eval_iters", "lora_rank")
        for name in positive:
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.data_path:
            p.append("--data-path needs at least one JSONL file")
        world = self.world_size or self.tp * self.pp
        if self.tp >= 1 and self.pp >= 1 and world % (self.tp * self.pp):
            p.append(f"world size {world} is not a multiple of TP({self.tp}) x PP({self.pp}); "
                     "data parallel = world / (TP x PP) must be whole")
        elif self.micro_batch_size >= 1 and self.global_batch_size % (self.micro_batch_size * max(self.dp, 1)):
            p.append(f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
                     f"({self.micro_batch_size}) x data parallel ({self.dp})")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            p.append(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr})")
        if self.lr_decay_style not in DECAY_STYLES:
            p.append(f"--lr-decay-style {self.lr_decay_style!r}: choose one of {DECAY_STYLES}")
        if self.lr_warmup_iters < 0 or self.lr_warmup_iters > self.decay_iters:
            p.append(f"--lr-warmup-iters {self.lr_warmup_iters} must be within 0..{self.decay_iters} (decay iters)")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            p.append("--adam-beta1/--adam-beta2 must lie in [0, 1)")
        if self.weight_decay < 0 or self.clip_grad < 0:
            p.append("--weight-decay and --clip-grad must be >= 0")
        for name in ("save_interval", "eval_interval", "exit_interval"):
            v = getattr(self, name)
            if v is not None and v < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1 (or omitted), got {v}")
        if not 0 <= self.valid_fraction < 1:
            p.append(f"--valid-fraction must lie in [0, 1), got {self.valid_fraction}")
        if self.overlong not in OVERLONG:
            p.append(f"--overlong {self.overlong!r}: choose one of {OVERLONG}")
        if self.finetune_method not in FINETUNE_METHODS:
            p.append(f"--finetune-method {self.finetune_method!r}: choose one of {FINETUNE_METHODS}")
        if self.lora:
            bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
            if bad or not self.lora_targets:
                p.append(f"--lora-targets {list(bad) or '(none)'} not understood; choose from {LORA_TARGETS}")
            if not 0 <= self.lora_dropout < 1:
                p.append(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if p:
            raise ConfigError("; ".join(p))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k in ("data_path", "valid_data_path", "lora_targets"):
            out[k] = list(out[k])
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**raw)
