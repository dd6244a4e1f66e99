#!/usr/bin/env bash
# One short device check that always reports: one JSON line per section, each printed as soon as it
# is measured (see bench/gpu_check.py for the sections). Well inside 8 minutes on one H200.
# Usage: bench/gpu_check.sh [--tiny|--dry-run] [--sections env,bandwidth,...] [--new-tokens N]
#        (PYTHON=... picks the interpreter; the engine sections need only torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec env PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "$PY" -m bench.gpu_check "$@"
