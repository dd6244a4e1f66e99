"""Run tasks through lm-eval for two models and write the parity table (JSON + Markdown).

Per task: the reference's score, ours, and the percent error |ref - ours| / ref; their mean.
Beside it, over every scored continuation, the mean |delta log-prob|, and the agreement of
greedy generations (a probe on the first items of each JSONL task, plus any generative task).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.evaluation.tasks import TaskFileError, TaskSet

# Pass/fail limits, by (our dtype, reference dtype). Same dtype fp32: the two implementations
# must agree to rounding. bf16 carries ~3 significant digits: rounding differs between any two
# implementations, so log-probs move by a few 1e-2 against a bf16 reference (~0.1 against
# fp32), an item near a tie may flip (``tolerated_flips`` per task; with few items one flip
# is many percent), and a 16-token greedy continuation often diverges somewhere, so its
# agreement is reported but not required.
THRESHOLDS: dict[tuple[str, str], dict[str, float]] = {
    ("fp32", "fp32"): {"max_percent_error": 1.0, "tolerated_flips": 0, "mean_abs_logprob_delta": 1e-3,
                       "min_greedy_agreement": 0.9},
    ("bf16", "bf16"): {"max_percent_error": 5.0, "tolerated_flips": 1, "mean_abs_logprob_delta": 0.05,
                       "min_greedy_agreement": 0.0},
    ("bf16", "fp32"): {"max_percent_error": 15.0, "tolerated_flips": 1, "mean_abs_logprob_delta": 0.2,
                       "min_greedy_agreement": 0.0},
}
THRESHOLDS[("fp32", "bf16")] = THRESHOLDS[("bf16", "fp32")]
GREEDY_ITEMS = 8
GREEDY_TOKENS = 16


@dataclass
class ModelRun:
    """What one model produced on a task set."""
    label: str
    dtype: str
    scores: dict[str, dict[str, float]]                           # task -> {metric: value}
    n_docs: dict[str, int]
    loglikelihoods: dict[str, list] = field(default_factory=dict)  # "task/doc/i" -> [logprob, greedy]
    generations: dict[str, str] = field(default_factory=dict)      # "task/doc/i" -> text
    seconds: float = 0.0
    doc_metrics: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # task -> per doc

    @property
    def items(self) -> int:
        return sum(self.n_docs.values())

    def head(self, n: int) -> "ModelRun":
        """This run as if it had used ``limit=n`` (lm-eval takes the first docs): mean-aggregated
        metrics are recomputed from the per-doc values; others are dropped."""
        scores, n_docs = {}, {}
        for task, docs in self.doc_metrics.items():
            kept = docs[:n]
            n_docs[task] = len(kept)
            scores[task] = {}
            for m, full in self.scores[task].items():
                vals = [d[m] for d in docs if m in d]
                if len(vals) == len(docs) and vals and abs(sum(vals) / len(vals) - full) < 1e-9:
                    scores[task][m] = sum(d[m] for d in kept) / len(kept)

        def keep(key: str) -> bool:
            return int(key.split("/")[-2]) < n

        return ModelRun(self.label, self.dtype, scores, n_docs,
                        {k: v for k, v in self.loglikelihoods.items() if keep(k)},
                        {k: v for k, v in self.generations.items() if keep(k)},
                        self.seconds * sum(n_docs.values()) / max(self.items, 1),
                        {t: d[:n] for t, d in self.doc_metrics.items()})


def _offline() -> None:
    # lm-eval and datasets otherwise probe the hub for every task
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _check_names(tasks: TaskSet, tm) -> None:
    known = set(tm.all_tasks)
    missing = [n for n in tasks.names if n not in known]
    if missing:
        raise TaskFileError(f"task(s) {', '.join(missing)} not found in {', '.join(map(str, tasks.include_paths))}; "
                            "check the task names in the YAML files")


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in result.items():
        metric, _, filt = k.partition(",")
        if filt and "_stderr" not in metric and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[metric if filt == "none" else f"{metric},{filt}"] = float(v)
    return out


def greedy_probe(lm, tasks: TaskSet, limit: int | None, n_items: int, max_tokens: int) -> dict[str, str]:
    """Greedy continuations of the first queries of each JSONL task (stop at a newline)."""
    from lm_eval.api.instance import Instance

    reqs, keys = [], []
    for name, items in tasks.items.items():
        for doc_id, item in enumerate(items[: min(n_items, limit or n_items)]):
            reqs.append(Instance("generate_until", item, (item["query"], {"until": ["\n"], "max_gen_toks": max_tokens}),
                                 idx=0, metadata=(name, doc_id, 1)))
            keys.append(f"probe:{name}/{doc_id}/0")
    return dict(zip(keys, lm.generate_until(reqs))) if reqs else {}


def run_model(lm, tasks: TaskSet, *, label: str, dtype: str, limit: int | None = None,
              greedy_items: int = GREEDY_ITEMS, greedy_tokens: int = GREEDY_TOKENS) -> ModelRun:
    """Evaluate ``lm`` (an lm-eval LM) on ``tasks`` with lm-eval; keep every per-request answer."""
    _offline()
    from lm_eval import evaluator

    tm = tasks.task_manager()
    _check_names(tasks, tm)
    t0 = time.perf_counter()
    res = evaluator.simple_evaluate(model=lm, tasks=list(tasks.names), task_manager=tm, limit=limit,
                                    log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    run = ModelRun(label, dtype, {}, {})
    for name in tasks.names:
        run.scores[name] = _metrics(res["results"][name])
        samples = res["samples"][name]
        run.n_docs[name] = len(samples)
        samples = sorted(samples, key=lambda s: s["doc_id"])
        run.doc_metrics[name] = [{m: float(s[m]) for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}
                                 for s in samples]
        for s in samples:
            for i, resp in enumerate(s["resps"]):
                r = resp[0]
                key = f"{name}/{s['doc_id']}/{i}"
                if isinstance(r, str):
                    run.generations[key] = r
                elif isinstance(r, (tuple, list)):
                    run.loglikelihoods[key] = [float(r[0]), bool(r[1])]
                else:
                    run.loglikelihoods[key] = [float(r), None]
    run.generations.update(greedy_probe(lm, tasks, limit, greedy_items, greedy_tokens))
    run.seconds = time.perf_counter() - t0
    return run


def _primary(scores: dict[str, float]) -> str:
    for m in ("acc", "exact_match", "acc_norm"):
        if m in scores:
            return m
    return sorted(scores)[0]


def percent_error(ref: float, ours: float) -> float:
    if ref == ours:
        return 0.0
    return math.inf if ref == 0 else abs(ref - ours) / abs(ref) * 100.0


def compare(ours: ModelRun, ref: ModelRun, *, checkpoint: str = "", reference: str = "",
            thresholds: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parity report of ``ours`` against ``ref`` (tasks both ran), with a verdict."""
    limits = dict(THRESHOLDS.get((ours.dtype, ref.dtype), THRESHOLDS[("bf16", "fp32")]))
    limits.update(thresholds or {})
    rows = []
    for task in [t for t in ref.scores if t in ours.scores]:
        metric = _primary(ref.scores[task])
        r, o = ref.scores[task][metric], ours.scores[task].get(metric, math.nan)
        rows.append({"task": task, "metric": metric, "n": ours.n_docs[task], "reference": r, "ours": o,
                     "percent_error": percent_error(r, o)})
    errs = [row["percent_error"] for row in rows]
    common = [k for k in ref.loglikelihoods if k in ours.loglikelihoods]
    deltas = [abs(ours.loglikelihoods[k][0] - ref.loglikelihoods[k][0]) for k in common]
    flags = [k for k in common if ref.loglikelihoods[k][1] is not None]
    gens = [k for k in ref.generations if k in ours.generations]
    report = {
        "checkpoint": checkpoint, "reference": reference, "dtype": ours.dtype, "reference_dtype": ref.dtype,
        "tasks": rows,
        "mean_percent_error": sum(errs) / len(errs) if errs else None,
        "max_percent_error": max(errs) if errs else None,
        "logprob": {"n": len(deltas), "mean_abs_delta": sum(deltas) / len(deltas) if deltas else None,
                    "max_abs_delta": max(deltas) if deltas else None,
                    "is_greedy_agreement": (sum(ours.loglikelihoods[k][1] == ref.loglikelihoods[k][1] for k in flags)
                                            / len(flags)) if flags else None},
        "greedy": {"n": len(gens), "agreement": (sum(ours.generations[k] == ref.generations[k] for k in gens)
                                                 / len(gens)) if gens else None,
                   "examples": [{"key": k, "reference": ref.generations[k], "ours": ours.generations[k]}
                                for k in gens[:3]]},
        "throughput": {"ours_items_per_s": ours.items / ours.seconds if ours.seconds else None,
                       "reference_items_per_s": ref.items / ref.seconds if ref.seconds else None},
        "thresholds": limits,
        **(extra or {}),
    }
    report["failures"] = _failures(report, limits)
    report["passed"] = not report["failures"]
    return report


def _failures(rep: dict[str, Any], limits: dict[str, float]) -> list[str]:
    out = []
    if not rep["tasks"]:
        out.append("no task was scored by both models")
    for row in rep["tasks"]:
        allowed = limits["max_percent_error"]
        if row["reference"] > 0 and row["n"]:
            # the error that ``tolerated_flips`` items changing their answer would cause
            allowed = max(allowed, limits.get("tolerated_flips", 0) * 100.0 / (row["n"] * row["reference"]))
        if not row["percent_error"] <= allowed + 1e-9:
            out.append(f"{row['task']}: {row['metric']} error {_pct(row['percent_error'])} > {allowed:.2f}%")
    d = rep["logprob"]["mean_abs_delta"]
    if d is not None and not d <= limits["mean_abs_logprob_delta"]:
        out.append(f"mean |delta log-prob| {d:.3g} > {limits['mean_abs_logprob_delta']}")
    g = rep["greedy"]["agreement"]
    if g is not None and g < limits["min_greedy_agreement"]:
        out.append(f"greedy agreement {g:.1%} < {limits['min_greedy_agreement']:.0%}")
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}%")


def render_markdown(rep: dict[str, Any]) -> str:
    lines = [f"# Evaluation parity ({rep['dtype']}; reference {rep['reference_dtype']})", "",
             f"- checkpoint: `{rep['checkpoint']}`", f"- reference: `{rep['reference']}`"]
    if rep.get("parallel"):
        lines.append(f"- parallel: TP={rep['parallel']['tp']} PP={rep['parallel']['pp']}")
    lines += ["", "| Task | Metric | Items | Reference | Ours | Error |", "|---|---|---:|---:|---:|---:|"]
    for r in rep["tasks"]:
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['reference']:.4f} | {r['ours']:.4f} | "
                     f"{_pct(r['percent_error'])} |")
    lines.append(f"| **Mean** | | | | | **{_pct(rep['mean_percent_error'])}** |")
    lp, g = rep["logprob"], rep["greedy"]
    lines += [""]
    if lp["n"]:
        lines.append(f"Mean |Δ log-prob| {lp['mean_abs_delta']:.3g} over {lp['n']} scored continuations "
                     f"(max {lp['max_abs_delta']:.3g}); is-greedy flags agree on {lp['is_greedy_agreement']:.1%}.")
    if g["n"]:
        lines.append(f"Greedy agreement: {g['agreement']:.1%} of {g['n']} generations identical.")
    tp = rep["throughput"]
    if tp["ours_items_per_s"] and tp["reference_items_per_s"]:
        lines.append(f"Throughput: ours {tp['ours_items_per_s']:.2f} items/s, reference {tp['reference_items_per_s']:.2f} items/s.")
    lines += ["", f"**{'PASSED' if rep['passed'] else 'FAILED'}** (limits: " +
              ", ".join(f"{k} {v}" for k, v in rep["thresholds"].items()) + ")"]
    lines += [f"- {f}" for f in rep["failures"]]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_safe(o: Any) -> Any:
    """JSON has no infinity: a percent error against a zero reference score becomes null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def write_report(rep: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``eval_<dtype>.json`` and ``.md`` in ``out_dir`` (written whole or not at all)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{rep['dtype']}"
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    _atomic_write(js, json.dumps(_json_safe(rep), indent=2, allow_nan=False) + "\n")
    _atomic_write(md, render_markdown(rep))
    return js, md


def save_run(run: ModelRun, path: str | Path) -> None:
    _atomic_write(Path(path), json.dumps(asdict(run)))
