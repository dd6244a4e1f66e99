"""Parity of a converted checkpoint against HF transformers run on the source weights.

The reference is transformers' model built from the *source* tensors; the candidate is this
project's model (``shared.model``) built from the *written* checkpoint. Both see weights in
the checkpoint's dtype and compute in fp32, so the report measures the conversion and the
model code, not dtype rounding. The report (JSON + a short text) is stored in the checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from shared.config import ModelConfig
from shared.checkpoint import layout as L
from shared.checkpoint.safe_io import CheckpointError, dtype_name

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
)
DEFAULT_TOLERANCE = 1e-3
GREEDY_TOKENS = 8


class ParityError(CheckpointError):
    """The converted checkpoint does not reproduce the source model."""


@dataclass
class ParityReport:
    passed: bool
    max_abs_logit_diff: float
    tolerance: float
    greedy_tokens: int
    greedy_agreement: float           # fraction of greedy tokens identical, over all prompts
    dtype: str
    compute_dtype: str = "fp32"
    prompts: list[str] = field(default_factory=list)
    per_prompt_max_diff: list[float] = field(default_factory=list)
    reference: str = "transformers AutoModelForCausalLM on the source weights"
    candidate: str = "shared.model LlamaStage (TP1/PP1) on the written checkpoint"
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"parity {verdict}: max |dlogits| {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:g}) over "
                f"{len(self.prompts)} prompts; greedy agreement {self.greedy_agreement:.0%} over "
                f"{self.greedy_tokens} tokens each; weights {self.dtype}, compute {self.compute_dtype}")


def _hf_reference(cfg: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_hf("float32").items() if k != "architectures"})
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    state = {n: _rows(get(n), cfg, n).to(dtype).to(torch.float32) for n in L.hf_names(cfg)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"parity: transformers model does not match the weights: missing {missing}, "
                              f"unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _rows(t: torch.Tensor, cfg: ModelConfig, name: str) -> torch.Tensor:
    return t[: cfg.vocab_size] if name in ("model.embed_tokens.weight", "lm_head.weight") else t


def _candidate(cfg: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype):
    from shared.model import load_hf_single

    state = {n: get(n).to(dtype).to(torch.float32) for n in L.hf_names(cfg)}
    return load_hf_single(cfg, state, torch.float32)


@torch.no_grad()
def _greedy_hf(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens, decoding with transformers' own KV cache."""
    out, past, step = [], None, ids
    for _ in range(n):
        res = model(input_ids=step, cache=past, use_cache=True)
        past, nxt = res.cache, res.logits[:, -1].argmax(-1)
        out.append(int(nxt))
        step = nxt.view(1, 1)
    return out


@torch.no_grad()
def _greedy_ours(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens, decoding with our KV cache (slot = position)."""
    cache = model.new_cache(1, ids.shape[1] + n)
    logits, out = model(ids, cache=cache), []
    for i in range(n):
        nxt = logits[:, -1].argmax(-1)
        out.append(int(nxt))
        pos = torch.full((1, 1), ids.shape[1] + i)
        logits = model(nxt.view(1, 1), position_ids=pos, cache=cache)
    return out


def estimate_bytes(cfg: ModelConfig) -> int:
    """Memory the check needs: two fp32 copies of the model."""
    return 2 * 4 * cfg.num_parameters()


@torch.no_grad()
def check_parity(cfg: ModelConfig, reference: Callable[[str], torch.Tensor], candidate: Callable[[str], torch.Tensor],
                 tokenizer, dtype: torch.dtype, tolerance: float = DEFAULT_TOLERANCE,
                 greedy_tokens: int = GREEDY_TOKENS, prompts: tuple[str, ...] = PROMPTS) -> ParityReport:
    """Compare logits and greedy continuations of the two weight sets on fixed prompts."""
    t0 = time.monotonic()
    ref_model = _hf_reference(cfg, reference, dtype)
    cand = _candidate(cfg, candidate, dtype)
    diffs, agree, total = [], 0, 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        ids = ids.clamp(max=cfg.vocab_size - 1)
        a, b = ref_model(input_ids=ids).logits.float(), cand(ids).float()
        diffs.append(float((a - b).abs().max()))
        ga, gb = _greedy_hf(ref_model, ids, greedy_tokens), _greedy_ours(cand, ids, greedy_tokens)
        agree += sum(x == y for x, y in zip(ga, gb))
        total += greedy_tokens
    worst = max(diffs)
    agreement = agree / total if total else 1.0
    return ParityReport(
        passed=worst <= tolerance and agreement == 1.0, max_abs_logit_diff=worst, tolerance=tolerance,
        greedy_tokens=greedy_tokens, greedy_agreement=agreement, dtype=dtype_name(dtype), prompts=list(prompts),
        per_prompt_max_diff=diffs, seconds=round(time.monotonic() - t0, 3))


def store_report(directory: Path, report: ParityReport) -> None:
    (Path(directory) / "parity.json").write_text(json.dumps(report.to_dict(), indent=2))
    (Path(directory) / "parity.txt").write_text(report.summary() + "\n")
