"""What a conversion is asked to do: ``ConvertOptions`` and the choices of each option
(Megatron-LM's checkpoint-converter vocabulary). Torch-free, so a CLI parses and a service
validates without loading the converter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOADERS = ("llama_mistral", "mcore")
CHECKPOINT_TYPES = ("hf", "meta")
SAVERS = ("mcore", "megatron", "hf")
CKPT_FORMATS = ("native", "torch")
TRANSFORMER_IMPLS = ("local", "transformer_engine")  # parameter names of the Megatron-LM layout
VALIDATE_DTYPES = ("fp32", "bf16")


@dataclass
class ConvertOptions:
    load_dir: Path
    save_dir: Path
    loader: str = "llama_mistral"        # llama_mistral (HF or Meta source) | mcore (native or Megatron-LM torch layout)
    checkpoint_type: str = "hf"          # hf | meta  (for llama_mistral)
    saver: str = "mcore"                 # mcore | megatron | hf
    ckpt_format: str = "native"          # native | torch
    target_tp: int = 1
    target_pp: int = 1
    dtype: str | None = None             # bf16|fp16|fp32; None = the source's dtype
    tokenizer_model: Path | None = None
    model_size: str | None = None        # preset cross-check
    make_vocab_size_divisible_by: int = 128
    true_vocab_size: int | None = None
    validate: bool = True
    validate_dtype: str = "fp32"         # compute dtype of the parity check: fp32 | bf16
    overwrite: bool = False
    transformer_impl: str = "local"
    command: str | None = None           # recorded in the provenance (the CLI passes its argv)
    source_label: str | None = None      # recorded instead of host paths (a service names its checkpoint)
