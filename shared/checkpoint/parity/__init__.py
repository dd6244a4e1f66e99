"""Parity of a written checkpoint against HF transformers run on the source weights, at any size.

The reference is transformers' own modules for the source architecture on the *source* tensors
(``reference``); the candidate is this project's model at the written checkpoint's own TP and
PP, every rank loading its shard of the *written* files (``candidate``). Both run layer by layer
with one layer's weights resident (``plan`` has the memory formula), side by side, on fixed
prompts teacher-forced as one batch, each carrying its own hidden states so error accumulates
as it would in use. Weights are in the checkpoint's dtype and computed in fp32 (bf16 on
request, with its own tolerance).

The report: max |Δlogits| and |Δlog-prob| over every position and token, top-1 agreement at
every position, a greedy continuation where re-reading the weights per token is cheap, and per
layer the max |Δhidden| after attention and after the MLP, so a divergence names its layer and
sublayer. It is stored in the checkpoint (``parity.json``, ``parity.txt``).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from shared.config import ModelConfig
from shared.checkpoint.layout import hf_names
from shared.checkpoint.parity.candidate import Candidate, Written
from shared.checkpoint.parity.plan import BLOCK_BYTES, Plan, make_plan
from shared.checkpoint.parity.reference import EMBED, Reference
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import TensorSource
from shared.dtypes import dtype_name

__all__ = ["ParityError", "ParityReport", "Tolerance", "Written", "check", "check_directories", "prompt_ids",
           "store_report", "stream"]

PROMPTS = (
    "The history of the city begins in the third century, when a small settlement of fishermen and traders "
    "grew up around the natural harbour at the mouth of the river. Over the next five hundred years it became "
    "one of the busiest ports on the coast, and its markets drew merchants from every part of the known world.",
    "def merge_sorted(left, right):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    result, i, j "
    "= [], 0, 0\n    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n            "
    "result.append(left[i])\n            i += 1\n        else:\n            result.append(right[j])\n",
    "Q: A train leaves the station at nine in the morning travelling at sixty miles per hour, and a second "
    "train leaves the same station an hour later at eighty miles per hour on a parallel track. At what time "
    "does the second train catch up with the first?\nA: Let us work it out step by step.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
    "energy. Carbon dioxide and water are combined into glucose and oxygen, using the energy of sunlight "
    "that the chlorophyll in the chloroplasts of the leaf cells has captured.",
)
PROMPT_TOKENS = 32


class ParityError(CheckpointError):
    """The converted checkpoint does not reproduce the source model."""


@dataclass(frozen=True)
class Tolerance:
    """max |Δlogits| and max |Δlog-prob| ≤ atol + rtol · max |reference logit|; after every sublayer,
    max |Δhidden| ≤ hidden · the largest reference hidden state so far (the residual stream carries
    every earlier layer's rounding, at the magnitudes it went through)."""

    atol: float
    rtol: float
    hidden: float

    def logits(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# bf16 sums TP partials in bf16: a few ulps (2^-8 each) of the largest activations per layer
TOLERANCES = {torch.float32: Tolerance(atol=1e-3, rtol=0.0, hidden=1e-4),
              torch.bfloat16: Tolerance(atol=0.0, rtol=0.1, hidden=0.05)}


@dataclass
class ParityReport:
    passed: bool
    max_abs_logit_diff: float
    max_abs_logprob_diff: float
    tolerance: float                  # on logits and log-probs, absolute (``tolerance_rule`` applied)
    tolerance_rule: str
    logit_scale: float                # max |reference logit|
    hidden_tolerance: float
    top1_agreement: float             # teacher-forced, over every position of every prompt
    positions: int
    greedy_tokens: int                # per prompt; 0 when skipped (see ``notes``)
    greedy_agreement: float | None
    dtype: str                        # the weights
    compute_dtype: str
    tp: int
    pp: int
    divergence: dict[str, Any] | None  # the first layer / sublayer over its tolerance
    worst: dict[str, Any]              # the (layer, sublayer) with the largest relative |Δhidden|
    embedding_max_abs_diff: float
    layers: list[dict[str, float]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    prompt_tokens: int = PROMPT_TOKENS
    notes: list[str] = field(default_factory=list)
    reference: str = "transformers' modules for the source architecture, layer by layer on the source weights"
    candidate: str = "shared.model, layer by layer on the written rank files, at the checkpoint's TP and PP"
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    planned_peak_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        where = ""
        if self.divergence:
            d = self.divergence
            where = (f" diverges at {d['where']} (max |d| {d['max_abs_diff']:.3g}, {d['relative']:.3g} of its scale"
                     if "relative" in d else f" diverges at {d['where']} (max |d| {d['max_abs_diff']:.3g}")
            where += f"; tolerance {d['tolerance']:g});"
        greedy = (f"greedy agreement {self.greedy_agreement:.0%} over {self.greedy_tokens} tokens per prompt"
                  if self.greedy_agreement is not None else "greedy skipped")
        return (f"parity {verdict}:{where} max |dlogits| {self.max_abs_logit_diff:.3g}, max |dlogprob| "
                f"{self.max_abs_logprob_diff:.3g} (tolerance {self.tolerance:g}); top-1 agreement "
                f"{self.top1_agreement:.1%} over {self.positions} positions; {greedy}; max |dhidden| "
                f"{self.worst['relative']:.3g} of its scale at {self.worst['where']} (tolerance "
                f"{self.hidden_tolerance:g}); TP{self.tp} PP{self.pp}, weights {self.dtype}, compute "
                f"{self.compute_dtype}; {self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB")

    def table(self) -> str:
        """Per layer: max |Δhidden| after attention and after the MLP, and the reference's scale."""
        rows = ["max |dhidden| per sublayer, and (scale) the largest reference |hidden| so far",
                "layer  attention   (scale)     mlp         (scale)"]
        rows += [f"{r['layer']:5d}  {r['attention']:.3e}  ({r['attention_scale']:.3g})  {r['mlp']:.3e}  "
                 f"({r['mlp_scale']:.3g})" for r in self.layers]
        return "\n".join(rows)


# ---- the two sides, run together --------------------------------------------------------------

def _max_abs(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    d = a.float() if b is None else a.float() - b.float()
    return float(d.abs().max())


@dataclass
class Pass:
    """One forward pass of both sides: fp32 logits and what each sublayer did to the hidden states."""

    ref_logits: torch.Tensor
    cand_logits: torch.Tensor
    embedding: tuple[float, float]                 # (max |Δ|, reference scale)
    layers: list[dict[str, float]]


class Sides:
    """The reference and the candidate, stepped layer by layer at the same time (the candidate on a
    helper thread, or its ranks)."""

    def __init__(self, reference, candidate, num_layers: int) -> None:
        self.ref, self.cand, self.num_layers = reference, candidate, num_layers
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="parity-candidate")

    def _both(self, op: str, ref_args: tuple, cand_args: tuple):
        fut = self._pool.submit(getattr(self.cand, op), *cand_args)
        return getattr(self.ref, op)(*ref_args), fut.result()

    def forward(self, ids_ref: torch.Tensor, ids_cand: torch.Tensor, tick: Callable[[], None] | None = None,
                start: int = 0, capacity: int = 0) -> Pass:
        """Both sides over their ids at positions ``start``...; ``capacity``: KV-cache the pass (see ``embed``)."""
        tick = tick or (lambda: None)
        # the candidate's own copy: sending a tensor to the ranks moves its storage into shared memory
        hr, hc = self._both("embed", (ids_ref, start, capacity), (ids_cand.clone(), start, capacity))
        scale = _max_abs(hr)
        embedding, layers = (_max_abs(hr, hc), scale), []
        for i in range(self.num_layers):
            (ar, hr), (ac, hc) = self._both("layer", (i, hr), (i, hc))
            att_scale = scale = max(scale, _max_abs(ar))
            scale = max(scale, _max_abs(hr))
            layers.append({"layer": i, "attention": _max_abs(ar, ac), "attention_scale": att_scale,
                           "mlp": _max_abs(hr, hc), "mlp_scale": scale})
            tick()
        lr, lc = self._both("head", (hr,), (hc,))
        tick()
        return Pass(lr, lc, embedding, layers)

    def close(self) -> None:
        self._pool.shutdown()
        try:
            self.cand.close()
        finally:
            self.ref.close()


def open_sides(cfg: ModelConfig, reference: TensorSource, written: Written, dtype: torch.dtype,
               compute: torch.dtype, plan: Plan, pool=None) -> Sides:
    cand = Candidate(cfg, written, compute, plan.block_rows, pool)
    try:
        ref = Reference(cfg, reference, dtype, compute, plan.block_rows)
    except BaseException:
        cand.close()
        raise
    return Sides(ref, cand, cfg.num_layers)


def prompt_ids(tokenizer, cfg: ModelConfig, prompts: Sequence[str] = PROMPTS,
               tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """(B, S): every prompt tokenized and cut to the same length, at most ``tokens``."""
    ids = [list(tokenizer(p).input_ids) for p in prompts]
    n = min(tokens, *(len(i) for i in ids))
    return torch.tensor([i[:n] for i in ids]).clamp(max=cfg.vocab_size - 1)


def _plan(cfg: ModelConfig, reference: TensorSource, written: Written, ids: torch.Tensor, dtype: torch.dtype,
          compute: torch.dtype, block_bytes: int, greedy_tokens: int | None) -> Plan:
    return make_plan(cfg, written.layout, dtype, compute, *ids.shape, source=reference.dtype(hf_names(cfg)[0]),
                     block_bytes=block_bytes, greedy_tokens=greedy_tokens)


def stream(cfg: ModelConfig, reference: TensorSource, written: Written, ids: torch.Tensor, dtype: torch.dtype,
           compute_dtype: torch.dtype = torch.float32, pool=None, block_bytes: int = BLOCK_BYTES) -> Pass:
    """One teacher-forced pass of both sides over ``ids``."""
    sides = open_sides(cfg, reference, written, dtype, compute_dtype,
                       _plan(cfg, reference, written, ids, dtype, compute_dtype, block_bytes, 0), pool)
    try:
        return sides.forward(ids, ids)
    finally:
        sides.close()


def greedy(sides: Sides, first: Pass, n: int, tolerance: float, tick=None) -> tuple[float, list[str]]:
    """``n`` greedy tokens on each side after the KV-cached pass ``first``, each side continuing its own
    text through its own cache. Returns the fraction of equal tokens and the first disagreements that
    are not near-ties of the reference (its margin > 2·tolerance)."""
    B, S = first.ref_logits.shape[:2]
    same, agree, problems, p = [True] * B, 0, [], first
    for k in range(n):
        lr, lc = p.ref_logits[:, -1], p.cand_logits[:, -1]
        nr, nc = lr.argmax(-1), lc.argmax(-1)
        for b in range(B):
            if same[b] and nr[b] != nc[b]:
                same[b] = False
                gap = float(lr[b, nr[b]] - lr[b, nc[b]])
                if gap > 2 * tolerance:
                    problems.append(f"greedy token {k} of prompt {b}: reference {int(nr[b])}, candidate "
                                    f"{int(nc[b])} (reference margin {gap:.3g})")
        agree += int((nr == nc).sum())
        if k + 1 < n:
            p = sides.forward(nr[:, None], nc[:, None], tick, start=S + k, capacity=S + n)
    return agree / (B * n), problems


# ---- the report ------------------------------------------------------------------------------

def _logit_stats(lr: torch.Tensor, lc: torch.Tensor) -> tuple[float, float, float]:
    """max |Δlogits|, max |Δlog-prob| and top-1 agreement, one prompt at a time."""
    dl = dlp = 0.0
    for a, b in zip(lr, lc):
        dl = max(dl, _max_abs(a, b))
        dlp = max(dlp, _max_abs(torch.log_softmax(a, -1), torch.log_softmax(b, -1)))
    return dl, dlp, float((lr.argmax(-1) == lc.argmax(-1)).float().mean())


def _sublayers(p: Pass):
    """(where, layer, sublayer, max |Δ|, scale) in the order the hidden states go through them."""
    yield "the embedding", None, "embedding", *p.embedding
    for r in p.layers:
        for sub in ("attention", "mlp"):
            yield f"layer {r['layer']} {sub}", r["layer"], sub, r[sub], r[f"{sub}_scale"]


def _divergence(p: Pass, dl: float, dlp: float, tol: Tolerance, limit: float) -> tuple[dict | None, dict]:
    """The first sublayer (or the output) over its tolerance, and the worst sublayer."""
    first, worst = None, None
    for where, layer, sub, d, scale in _sublayers(p):
        rel = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
        entry = {"where": where, "layer": layer, "sublayer": sub, "max_abs_diff": d, "relative": rel}
        if first is None and rel > tol.hidden:
            first = {**entry, "tolerance": tol.hidden}
        if worst is None or rel > worst["relative"]:
            worst = entry
    if first is None and max(dl, dlp) > limit:
        first = {"where": "the output layer", "layer": None, "sublayer": "output",
                 "max_abs_diff": dl if dl > limit else dlp, "tolerance": limit}
    return first, worst


def _report(p: Pass, greedy_result: tuple[float, list[str]] | None, tol: Tolerance, plan: Plan, ids: torch.Tensor,
            prompts: Sequence[str], dtype: torch.dtype, compute: torch.dtype) -> ParityReport:
    dl, dlp, top1 = _logit_stats(p.ref_logits, p.cand_logits)
    scale = _max_abs(p.ref_logits)
    divergence, worst = _divergence(p, dl, dlp, tol, tol.logits(scale))
    agreement, problems = greedy_result if greedy_result else (None, [])
    notes = list(problems)
    if greedy_result is None:
        notes.append(f"no greedy continuation ({plan.greedy_note}); the teacher-forced top-1 agreement "
                     "covers every position")
    return ParityReport(
        passed=divergence is None and not problems, max_abs_logit_diff=dl, max_abs_logprob_diff=dlp,
        tolerance=tol.logits(scale), logit_scale=scale, hidden_tolerance=tol.hidden,
        tolerance_rule=f"{tol.atol:g} + {tol.rtol:g} x max |reference logit|", top1_agreement=top1,
        positions=ids.numel(),
        greedy_tokens=plan.greedy_tokens, greedy_agreement=agreement, dtype=dtype_name(dtype),
        compute_dtype=dtype_name(compute), tp=plan.tp, pp=plan.pp, divergence=divergence, worst=worst,
        embedding_max_abs_diff=p.embedding[0], layers=p.layers, prompts=list(prompts), prompt_tokens=ids.shape[1],
        notes=notes, planned_peak_bytes=plan.peak_bytes)


class _PeakRSS:
    """The highest RSS of this process and its children (the ranks) together, sampled while open."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="parity-rss")

    def _sample(self) -> None:
        import psutil

        me, total = psutil.Process(), 0
        for proc in (me, *me.children(recursive=True)):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "_PeakRSS":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def check(cfg: ModelConfig, reference: TensorSource, written: Written, tokenizer, dtype: torch.dtype, *,
          compute_dtype: torch.dtype = torch.float32, tolerance: Tolerance | None = None,
          greedy_tokens: int | None = None, prompts: Sequence[str] = PROMPTS, prompt_tokens: int = PROMPT_TOKENS,
          pool=None, block_bytes: int = BLOCK_BYTES, on_step: Callable[[int, int], None] | None = None) -> ParityReport:
    """The parity report of ``written`` against ``reference`` (HF-named source tensors).

    ``dtype``: the written weights' dtype (the reference is rounded to it); ``greedy_tokens``:
    None decides by cost (``plan``); ``pool``: ranks to run the candidate on (default: its own);
    ``on_step(done, total)`` after every layer (it may raise to stop the check)."""
    t0 = time.monotonic()
    tol = tolerance or TOLERANCES[compute_dtype]
    ids = prompt_ids(tokenizer, cfg, prompts, prompt_tokens)
    plan = _plan(cfg, reference, written, ids, dtype, compute_dtype, block_bytes, greedy_tokens)
    n = plan.greedy_tokens
    total, done = (cfg.num_layers + 1) * max(1, n), [0]

    def tick() -> None:
        done[0] += 1
        if on_step is not None:
            on_step(done[0], total)

    with _PeakRSS() as rss:
        sides = open_sides(cfg, reference, written, dtype, compute_dtype, plan, pool)
        try:
            first = sides.forward(ids, ids, tick, capacity=ids.shape[1] + n if n else 0)
            cont = greedy(sides, first, n, tol.logits(_max_abs(first.ref_logits)), tick) if n else None
        finally:
            sides.close()
    rep = _report(first, cont, tol, plan, ids, prompts, dtype, compute_dtype)
    rep.seconds, rep.peak_rss_bytes = round(time.monotonic() - t0, 3), rss.peak
    return rep


# ---- a stored checkpoint against its source directory --------------------------------------------

def open_written(directory: Path) -> tuple[Written, ModelConfig, torch.dtype]:
    """A checkpoint on disk as the candidate reads it: native, Megatron-LM's torch layout, or HF."""
    from shared.checkpoint.opener import open_checkpoint

    ckpt = open_checkpoint(directory, formats=("native", "megatron-lm", "hf"))
    return Written(ckpt.format, ckpt.directory, ckpt.layout), ckpt.config, ckpt.dtype


def open_reference(directory: Path, cfg: ModelConfig) -> TensorSource:
    """The source weights, HF-named: an HF directory (memory-mapped) or a Meta one (merged and permuted
    one tensor at a time, in memory), checked against ``cfg``'s shapes."""
    import dataclasses

    from shared.checkpoint.hf import check_hf_shapes
    from shared.checkpoint.opener import declared, open_checkpoint

    d = Path(directory)
    if declared(d, ("hf", "meta")) not in ("hf", "meta"):
        raise CheckpointError(f"{d} is neither an HF checkpoint (config.json) nor a Meta one (params.json)")
    ref = open_checkpoint(d, formats=("hf", "meta"))
    src = ref.tensors(zero_copy=True)
    rows = src.shape(EMBED)[0] if EMBED in src else cfg.vocab_size
    check_hf_shapes(src, dataclasses.replace(cfg, vocab_size=rows))
    return src


def check_directories(checkpoint: Path, reference: Path, **kw) -> ParityReport:
    """The report of a stored checkpoint against the HF or Meta directory it was converted from."""
    from shared import tokenizer as tok

    written, cfg, dtype = open_written(Path(checkpoint))
    tok_dir = tok.resolve_tokenizer_dir(Path(checkpoint))
    has_tok = (tok_dir / "tokenizer.json").exists() or (tok_dir / "tokenizer.model").exists()
    tokenizer = tok.load_source_tokenizer(tok_dir if has_tok else Path(reference))
    return check(cfg, open_reference(Path(reference), cfg), written, tokenizer, dtype, **kw)


def store_report(directory: Path, report: ParityReport) -> None:
    (Path(directory) / "parity.json").write_text(json.dumps(report.to_dict(), indent=2))
    (Path(directory) / "parity.txt").write_text(report.summary() + "\n\n" + report.table() + "\n")
