"""``python -m services.generate eval``: benchmark parity of a checkpoint against its HF reference.

    python -m services.generate eval --load CKPT --reference HF_DIR --tasks all \\
        [--dtype fp32,bf16] [--tensor-parallel-size N] [--pipeline-parallel-size N] [--limit N] [--output DIR]

Runs the tasks with lm-eval on our model (TP x PP) and on the HF reference, and writes
``eval_<dtype>.json`` / ``.md`` (the per-task table, mean percent error, mean |delta log-prob|,
greedy agreement, verdict) into ``--output`` (default ``CKPT/eval``; the checkpoint's manifest
does not list that folder, so its file hashes stay valid), together with the task files used.
Exit status 0 when every report passed, 1 when one failed, 2 on bad input.

Tasks (comma separated): the bundled ``arithmetic_mc``, ``unscramble_mc``, ``dates_mc``,
``cloze_mc`` (or ``all``); a JSONL file of ``{"query", "choices", "gold"}`` items
(``NAME=PATH`` to name it); or a task of an lm-eval YAML directory given by ``--include-path``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from shared.evaluation.tasks import DEFAULT_ITEMS, DEFAULT_SEED


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--load", required=True, help="our checkpoint: a native checkpoint dir (or an HF dir)")
    p.add_argument("--reference", required=True, help="the HF model directory to compare against")
    p.add_argument("--tasks", default="all", help="comma-separated bundled names, JSONL paths or YAML task names")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, or both: fp32,bf16 (one report each)")
    p.add_argument("--reference-dtype", default="same", choices=["same", "fp32", "bf16"],
                   help="dtype of the HF reference: 'same' as ours (like for like, the default) or fixed "
                        "(fp32 also measures what bf16 costs)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="items generated per bundled task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the bundled tasks")
    p.add_argument("--include-path", action="append", default=[], help="a directory of lm-eval task YAML files")
    p.add_argument("--greedy-items", type=int, default=8, help="greedy-generation probe items per task (0: none)")
    p.add_argument("--reference-threads", type=int, default=0,
                   help="CPU threads for the HF reference (default: torch's choice)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per scoring batch")
    p.add_argument("--output", default=None, help="where to write the reports (default: CKPT/eval)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="python -m services.generate eval", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))


def _dtypes(value: str) -> list[str]:
    from shared.evaluation.engine import dtype_label, parse_dtype

    out = []
    for d in value.split(","):
        label = dtype_label(parse_dtype(d.strip()))
        if label not in out:
            out.append(label)
    return out


def _output_dir(args) -> Path:
    out = Path(args.output) if args.output else Path(args.load) / "eval"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write the reports to {out} ({e.strerror}); pass --output DIR") from None
    return out


def run(args: argparse.Namespace, pool=None) -> list[dict[str, Any]]:
    """Evaluate, write one report per dtype, and return the reports. ``pool``: a running
    ``ProcessGroupPool`` to use (default: one started and closed here)."""
    from shared.evaluation.engine import open_source
    from shared.evaluation.lm import HFReferenceLM, MegatronLM
    from shared.evaluation.report import compare, run_model, write_report
    from shared.evaluation.tasks import prepare_tasks
    from shared.parallel.dims import ParallelDims
    from shared.parallel.launcher import ProcessGroupPool

    dtypes = _dtypes(args.dtype)
    source = open_source(args.load)
    dims = ParallelDims(args.tensor_parallel_size, args.pipeline_parallel_size)
    dims.check_model(source.cfg)
    if not (Path(args.reference) / "config.json").exists():
        raise ValueError(f"--reference {args.reference} is not an HF model directory (no config.json)")
    created = not (Path(args.output) if args.output else Path(args.load) / "eval").exists()
    out = _output_dir(args)
    try:
        tasks = prepare_tasks(args.tasks.split(","), out / "tasks", items=args.items, seed=args.seed,
                              include_paths=args.include_path)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # leave nothing behind for a rejected request
        raise
    common = dict(limit=args.limit, greedy_items=args.greedy_items)

    refs: dict[str, Any] = {}
    reports = []
    own_pool = pool is None
    pool = pool or ProcessGroupPool(dims.world_size)
    try:
        for dtype in dtypes:
            ref_dtype = dtype if args.reference_dtype == "same" else args.reference_dtype
            if ref_dtype not in refs:
                lm = HFReferenceLM(args.reference, dtype=ref_dtype, batch_tokens=args.batch_tokens,
                                   threads=args.reference_threads or None)
                refs[ref_dtype] = run_model(lm, tasks, label="reference", dtype=ref_dtype, **common)
                lm.close()
            ours_lm = MegatronLM(args.load, dtype=dtype, tensor_parallel_size=dims.tp,
                                 pipeline_parallel_size=dims.pp, batch_tokens=args.batch_tokens, pool=pool)
            try:
                ours = run_model(ours_lm, tasks, label="ours", dtype=dtype, **common)
            finally:
                ours_lm.close()
            rep = compare(ours, refs[ref_dtype], checkpoint=str(Path(args.load).resolve()),
                          reference=str(Path(args.reference).resolve()),
                          extra={"parallel": {"tp": dims.tp, "pp": dims.pp}, "limit": args.limit,
                                 "task_sources": tasks.sources})
            js, md = write_report(rep, out)
            print(md.read_text(), flush=True)
            print(f"wrote {js} and {md}", file=sys.stderr, flush=True)
            reports.append(rep)
    finally:
        if own_pool:
            pool.close()
    return reports


def run_job(params: dict[str, Any], source_dir: Path, reference_dir: Path, out_dir: Path,
            progress=None, should_cancel=None) -> dict[str, Any]:
    """An ``eval`` job of the service: the checkpoint at its own TP/PP against the uploaded HF
    reference. Returns ``{"passed", "reports"}`` (the JSON reports, one per dtype)."""
    import json

    from shared.checkpoint.native import declared_format, load_manifest

    tp = pp = 1
    if declared_format(source_dir) == "native":
        layout = load_manifest(source_dir).layout
        tp, pp = layout.tp, layout.pp
    dtypes = list(params.get("dtype") or ["fp32"])
    argv = ["--load", str(source_dir), "--reference", str(reference_dir), "--tasks",
            ",".join(params.get("tasks") or ["all"]), "--dtype", ",".join(dtypes),
            "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp), "--output", str(out_dir)]
    if params.get("limit"):
        argv += ["--limit", str(params["limit"])]
    if should_cancel is not None and should_cancel():
        raise RuntimeError("cancelled before the evaluation started")
    if progress is not None:
        progress({"phase": "eval", "current": 0, "total": len(dtypes), "unit": "reports"})
    run(build_parser().parse_args(argv))
    reports = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("eval_*.json"))]
    for r in reports:  # checkpoint names, not the worker's paths
        r.update(checkpoint=params.get("source", ""), reference=params.get("reference", ""))
    if progress is not None:
        progress({"phase": "eval", "current": len(reports), "total": len(dtypes), "unit": "reports"})
    return {"passed": all(r["passed"] for r in reports), "reports": reports}


def main(argv: list[str] | None = None, pool=None) -> int:
    from shared.checkpoint.safe_io import CheckpointError
    from shared.evaluation.tasks import TaskFileError
    from shared.parallel.dims import LayoutError

    args = build_parser().parse_args(argv)
    try:
        reports = run(args, pool)
    except (TaskFileError, CheckpointError, LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["passed"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
