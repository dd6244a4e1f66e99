"""One evaluation as a pure function: ``run_eval(EvalParams(...), source_dir, reference_dir, out_dir)``.

Runs the tasks with lm-eval on our model (TP x PP) and on the HF reference, and writes one
``eval_<dtype>.json`` / ``.md`` report per dtype into ``out_dir`` with the task files used. The
command line (``python -m services.generate eval``) and the service's eval job both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shared.evaluation.tasks import DEFAULT_ITEMS, DEFAULT_SEED
from shared.progress import Progress

REFERENCE_DTYPES = ("same", "fp32", "bf16")


class Cancelled(Exception):
    """``should_cancel`` said stop before the evaluation started; no report was written."""


@dataclass(frozen=True)
class EvalParams:
    tasks: tuple[str, ...] = ("all",)        # bundled names, JSONL paths (NAME=PATH) or lm-eval YAML task names
    dtypes: tuple[str, ...] = ("fp32",)      # one report each
    reference_dtype: str = "same"            # "same" as ours, or fixed: fp32 | bf16
    tensor_parallel_size: int | None = None  # None: the checkpoint's stored layout (1 for an HF directory)
    pipeline_parallel_size: int | None = None
    limit: int | None = None                 # items per task (None: all)
    items: int = DEFAULT_ITEMS               # items generated per bundled task
    seed: int = DEFAULT_SEED                 # seed of the bundled tasks
    include_paths: tuple[str, ...] = ()      # directories of lm-eval task YAML files
    greedy_items: int = 8                    # greedy-generation probe items per task (0: none)
    reference_threads: int = 0               # CPU threads of the HF reference (0: torch's choice)
    batch_tokens: int = 1024                 # tokens per scoring batch
    checkpoint_label: str | None = None      # written in the reports instead of the paths (a job's names)
    reference_label: str | None = None

    def __post_init__(self) -> None:
        if self.reference_dtype not in REFERENCE_DTYPES:
            raise ValueError(f"reference dtype {self.reference_dtype!r}: choose one of {REFERENCE_DTYPES}")
        object.__setattr__(self, "dtypes", tuple(_dtype_labels(self.dtypes)))

    @classmethod
    def from_job(cls, params: dict[str, Any]) -> "EvalParams":
        """An ``eval`` job's parameters (the gateway's ``EvalJob``): checkpoint names, no paths."""
        return cls(tasks=tuple(params.get("tasks") or ["all"]), dtypes=tuple(params.get("dtype") or ["fp32"]),
                   limit=params.get("limit") or None, checkpoint_label=params.get("source", ""),
                   reference_label=params.get("reference", ""))


def _dtype_labels(values) -> list[str]:
    from shared.dtypes import dtype_name, parse_dtype

    out: list[str] = []
    for d in values:
        label = dtype_name(parse_dtype(str(d).strip()))
        if label not in out:
            out.append(label)
    return out


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write the reports to {out} ({e.strerror}); pass --output DIR") from None


def _layout(params: EvalParams, stored) -> tuple[int, int]:
    """TP and PP: the given ones, else the checkpoint's stored layout."""
    tp, pp = params.tensor_parallel_size, params.pipeline_parallel_size
    return (tp if tp is not None else stored.tp), (pp if pp is not None else stored.pp)


def _prepare(params: EvalParams, source_dir: Path, reference_dir: Path, out_dir: Path):
    """Check the inputs and write the task files; nothing is left in a new ``out_dir`` on refusal."""
    import shutil

    from shared.checkpoint.opener import open_checkpoint
    from shared.evaluation.tasks import prepare_tasks
    from shared.parallel.dims import ParallelDims

    source = open_checkpoint(source_dir)
    dims = ParallelDims(*_layout(params, source.layout))
    dims.check_model(source.config)
    if not (reference_dir / "config.json").exists():
        raise ValueError(f"--reference {reference_dir} is not an HF model directory (no config.json)")
    created = not out_dir.exists()
    _writable(out_dir)
    try:
        tasks = prepare_tasks(list(params.tasks), out_dir / "tasks", items=params.items, seed=params.seed,
                              include_paths=list(params.include_paths))
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)  # leave nothing behind for a rejected request
        raise
    return dims, tasks


def run_eval(params: EvalParams, source_dir: str | Path, reference_dir: str | Path, out_dir: str | Path,
             progress: Callable[[Progress], None] | None = None, should_cancel: Callable[[], bool] | None = None,
             *, pool=None, on_report: Callable[[dict, Path, Path], None] | None = None) -> dict[str, Any]:
    """Evaluate and write one report per dtype; returns ``{"passed", "reports"}``.

    ``pool``: a running ``ProcessGroupPool`` of TP x PP ranks (default: one started and closed
    here); ``on_report(report, json_path, md_path)`` after each report is written."""
    from shared.evaluation.report import write_report
    from shared.parallel.launcher import ProcessGroupPool

    source_dir, reference_dir, out_dir = Path(source_dir), Path(reference_dir), Path(out_dir)
    dims, tasks = _prepare(params, source_dir, reference_dir, out_dir)
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled before the evaluation started")
    report = progress or (lambda p: None)
    report(Progress("eval", 0, len(params.dtypes), "reports"))
    refs: dict[str, Any] = {}
    reports = []
    own_pool = pool is None
    pool = pool or ProcessGroupPool(dims.world_size)
    try:
        for dtype in params.dtypes:
            rep = _one_dtype(params, dtype, source_dir, reference_dir, dims, tasks, refs, pool)
            js, md = write_report(rep, out_dir)
            if on_report is not None:
                on_report(rep, js, md)
            reports.append(rep)
            report(Progress("eval", len(reports), len(params.dtypes), "reports"))
    finally:
        if own_pool:
            pool.close()
    return {"passed": all(r["passed"] for r in reports), "reports": reports}


def _one_dtype(params: EvalParams, dtype: str, source_dir: Path, reference_dir: Path, dims, tasks,
               refs: dict[str, Any], pool) -> dict[str, Any]:
    """Our model in ``dtype`` against the reference (each reference dtype is scored once)."""
    from shared.evaluation.lm import HFReferenceLM, MegatronLM
    from shared.evaluation.report import compare, run_model

    common = dict(limit=params.limit, greedy_items=params.greedy_items)
    ref_dtype = dtype if params.reference_dtype == "same" else params.reference_dtype
    if ref_dtype not in refs:
        lm = HFReferenceLM(str(reference_dir), dtype=ref_dtype, batch_tokens=params.batch_tokens,
                           threads=params.reference_threads or None)
        refs[ref_dtype] = run_model(lm, tasks, label="reference", dtype=ref_dtype, **common)
        lm.close()
    ours_lm = MegatronLM(str(source_dir), dtype=dtype, tensor_parallel_size=dims.tp, pipeline_parallel_size=dims.pp,
                         batch_tokens=params.batch_tokens, pool=pool)
    try:
        ours = run_model(ours_lm, tasks, label="ours", dtype=dtype, **common)
    finally:
        ours_lm.close()
    label = params.checkpoint_label if params.checkpoint_label is not None else str(source_dir.resolve())
    ref_label = params.reference_label if params.reference_label is not None else str(reference_dir.resolve())
    return compare(ours, refs[ref_dtype], checkpoint=label, reference=ref_label,
                   extra={"parallel": {"tp": dims.tp, "pp": dims.pp}, "limit": params.limit,
                          "task_sources": tasks.sources})
