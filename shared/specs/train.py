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


IO, TRAIN, PARALLEL, LOG, LORA = ("checkpoints and data", "training", "parallelism",
                                  "checkpointing, evaluation and logging", "LoRA")


def _opt(default: Any = dataclasses.MISSING, group: str = TRAIN, **meta: Any) -> Any:
    """A field with its command-line description (``shared.cli.add_dataclass_arguments``)."""
    return dataclasses.field(default=default, metadata={"group": group, **meta})


@dataclass(frozen=True)
class TrainConfig:
    load: str = _opt(group=IO, help="native checkpoint, HF model dir, or a run dir to resume")
    save: str = _opt(group=IO, help="run directory (checkpoints, release/, hf/, lora/)")
    data_path: tuple[str, ...] = _opt(group=IO, metavar="FILE", help="JSONL training files")
    train_iters: int = _opt()
    micro_batch_size: int = _opt(1)
    global_batch_size: int = _opt(1, cli_default=None, help="default: micro batch x data parallel")
    seq_length: int = _opt(512)
    lr: float = _opt(1e-5)
    min_lr: float = _opt(0.0)
    lr_warmup_iters: int = _opt(0)
    lr_decay_iters: int | None = _opt(None, help="default: --train-iters")
    lr_decay_style: str = _opt("cosine", choices=DECAY_STYLES)
    weight_decay: float = _opt(0.0)
    clip_grad: float = _opt(1.0, help="global gradient norm limit (0: off)")
    adam_beta1: float = _opt(0.9)
    adam_beta2: float = _opt(0.999)
    adam_eps: float = _opt(1e-8)
    seed: int = _opt(1234)
    tensor_model_parallel_size: int = _opt(1, PARALLEL)
    pipeline_model_parallel_size: int = _opt(1, PARALLEL)
    world_size: int | None = _opt(None, PARALLEL, help=(
        "processes to start (data parallel = world / (TP x PP)); default: TP x PP on CPU, all of the worker's "
        "GPUs (LLAMA_SVC_DEVICES, else every visible one; rounded down to a multiple of TP x PP) on GPU, one "
        "process per GPU"))
    bf16: bool = _opt(False, help="bf16 weights and activations, fp32 master weights")
    save_interval: int | None = _opt(None, LOG)
    eval_interval: int | None = _opt(None, LOG)
    eval_iters: int = _opt(10, LOG)
    valid_data_path: tuple[str, ...] = _opt((), IO, metavar="FILE", help=(
        "JSONL validation files (none: --valid-fraction holds samples out)"))
    valid_fraction: float = _opt(0.0, IO, help="without --valid-data-path: hold out this fraction of the samples")
    overlong: str = _opt("truncate", IO, choices=OVERLONG, help="samples longer than a sequence")
    recompute_activations: bool = _opt(False)
    metrics_file: str | None = _opt(None, LOG, help="JSONL: one line per iteration and evaluation")
    finetune: bool = _opt(False, IO, help="from a training checkpoint: load the weights only (new optimizer, "
                                          "iteration 0)")
    exit_interval: int | None = _opt(None, LOG, help="save and stop at this iteration")
    finetune_method: str = _opt("full", LORA, choices=FINETUNE_METHODS)
    lora_rank: int = _opt(8, LORA)
    lora_alpha: float = _opt(16.0, LORA)
    lora_dropout: float = _opt(0.0, LORA)
    lora_targets: tuple[str, ...] = _opt(LORA_TARGETS, LORA, choices=LORA_TARGETS)
    export_hf: bool = _opt(True, IO, help="skip the HF export")
    make_vocab_size_divisible_by: int = _opt(128, IO)

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
