"""Functions for the parity tests that run on the ranks of the test process pool, or in a fresh process.

``python -m tests.checkpoint.parity_fns SRC CKPT BLOCK_BYTES`` runs the streaming check at TP1 in a
new process, teacher-forced only (all that a model too large for greedy decoding gets), and prints
its memory as JSON: the RSS before and the high-water mark during the check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from shared.checkpoint import native
from shared.model import load_stage
from shared.parallel.pipeline import pipeline_forward


def full_logits(ctx, ckpt: str, ids: torch.Tensor):
    """The whole model at the checkpoint's TP/PP, every rank loading its stage: logits on the last stage's TP rank 0."""
    m = native.load_manifest(ckpt)
    state = native.load_rank_state_dict(ckpt, ctx.tp_rank, ctx.pp_rank, dtype=torch.float32)
    stage = load_stage(m.config, ctx, state, torch.float32, m.layout.divisible_by)
    out = pipeline_forward(stage, ctx, ids)
    return out if ctx.is_last_stage and ctx.tp_rank == 0 else None


def break_row_parallel(ctx, tp_rank: int) -> None:
    """On TP rank ``tp_rank`` only, row-parallel layers read their input columns in reverse order."""
    from shared.parallel import layers

    cls = layers.RowParallelLinear
    if ctx.tp_rank != tp_rank or "_sound_forward" in vars(cls):
        return
    cls._sound_forward = cls.forward
    cls.forward = lambda self, x: layers.reduce_from_tp(layers.linear(x, self.weight.flip(1)), self.group)


def mend_row_parallel(ctx) -> None:
    from shared.parallel import layers

    cls = layers.RowParallelLinear
    if "_sound_forward" in vars(cls):
        cls.forward = cls._sound_forward
        del cls._sound_forward


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(src: str, ckpt: str, block_bytes: int) -> dict:
    """RSS before the check and its high-water mark during it (reset first), in this process."""
    from shared.checkpoint import parity
    from shared.checkpoint.parity.reference import _skeleton
    from shared.checkpoint.tensors import open_hf_weights
    from shared.tokenizer import load_source_tokenizer

    torch.set_num_threads(1)
    m = native.load_manifest(ckpt)
    tokenizer = load_source_tokenizer(src)
    _skeleton(m.config, torch.float32)  # the transformers modules are imported before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss("VmRSS")
    rep = parity.check(m.config, open_hf_weights(Path(src), zero_copy=True),
                       parity.Written("native", ckpt, m.layout), tokenizer, m.dtype, block_bytes=block_bytes,
                       greedy_tokens=0)
    return {"before": before, "peak": _rss("VmHWM"), "passed": rep.passed, "planned": rep.planned_peak_bytes}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
