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
import sys
from pathlib import Path
from typing import Any

from shared.evaluation.run import REFERENCE_DTYPES, EvalParams, run_eval

DEFAULTS = EvalParams()  # the defaults, declared once


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--load", required=True,
                   help="our checkpoint: converted, HF, Meta, Megatron-LM, or a training run directory")
    p.add_argument("--reference", required=True, help="the HF model directory to compare against")
    p.add_argument("--tasks", default=",".join(DEFAULTS.tasks),
                   help="comma-separated bundled names, JSONL paths or YAML task names")
    p.add_argument("--dtype", default=",".join(DEFAULTS.dtypes),
                   help="fp32, bf16, or both: fp32,bf16 (one report each)")
    p.add_argument("--reference-dtype", default=DEFAULTS.reference_dtype, choices=REFERENCE_DTYPES,
                   help="dtype of the HF reference: 'same' as ours (like for like, the default) or fixed "
                        "(fp32 also measures what bf16 costs)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--pipeline-parallel-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--limit", type=int, default=DEFAULTS.limit, help="items per task (default: all)")
    p.add_argument("--items", type=int, default=DEFAULTS.items, help="items generated per bundled task")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the bundled tasks")
    p.add_argument("--include-path", action="append", default=[], help="a directory of lm-eval task YAML files")
    p.add_argument("--greedy-items", type=int, default=DEFAULTS.greedy_items,
                   help="greedy-generation probe items per task (0: none)")
    p.add_argument("--reference-threads", type=int, default=DEFAULTS.reference_threads,
                   help="CPU threads for the HF reference (default: torch's choice)")
    p.add_argument("--batch-tokens", type=int, default=DEFAULTS.batch_tokens, help="tokens per scoring batch")
    p.add_argument("--output", default=None, help="where to write the reports (default: CKPT/eval)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="python -m services.generate eval", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))


def params_from_args(args: argparse.Namespace) -> EvalParams:
    return EvalParams(tasks=tuple(args.tasks.split(",")), dtypes=tuple(args.dtype.split(",")),
                      reference_dtype=args.reference_dtype, tensor_parallel_size=args.tensor_parallel_size,
                      pipeline_parallel_size=args.pipeline_parallel_size, limit=args.limit, items=args.items,
                      seed=args.seed, include_paths=tuple(args.include_path), greedy_items=args.greedy_items,
                      reference_threads=args.reference_threads, batch_tokens=args.batch_tokens)


def _print_report(report: dict, js: Path, md: Path) -> None:
    print(md.read_text(), flush=True)
    print(f"wrote {js} and {md}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, pool=None) -> list[dict[str, Any]]:
    """Evaluate (``shared.evaluation.run.run_eval``), print each report, and return them. ``pool``:
    a running ``ProcessGroupPool`` to use (default: one started and closed there)."""
    out = Path(args.output) if args.output else Path(args.load) / "eval"
    return run_eval(params_from_args(args), args.load, args.reference, out, pool=pool,
                    on_report=_print_report)["reports"]


def main(argv: list[str] | None = None, pool=None) -> int:
    from shared.checkpoint.errors import CheckpointError
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
