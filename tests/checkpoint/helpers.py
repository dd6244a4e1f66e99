"""Shared checks for the checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.checkpoint import native
from shared.checkpoint.convert import ConvertOptions, convert
from shared.checkpoint.layout import Layout

PROMPT_IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 200, 11, 90, 31, 150, 260, 8, 77, 19, 140]])


def run(src: Path, out: Path, **kw) -> dict:
    return convert(ConvertOptions(load_dir=src, save_dir=out, **kw))


def hf_logits(hf_dir: Path, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def ckpt_logits(ckpt: Path, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    """Our model (TP1/PP1) on a native checkpoint, resharded on load from whatever layout it has."""
    from shared.model import load_stage
    from shared.parallel.state import ParallelContext

    m = native.load_manifest(ckpt)
    state = native.load_rank_state_dict(ckpt, 0, 0, Layout(1, 1, m.layout.divisible_by), dtype=torch.float32)
    model = load_stage(m.config, ParallelContext.single(), state, torch.float32, m.layout.divisible_by)
    with torch.no_grad():
        return model(ids)


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"
