"""The import layers of pyproject.toml's ``[tool.importlinter]`` hold: one check per contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint_imports() -> str:
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed: pip install -e '.[test]'"
    return found


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c["id"] for c in CONTRACTS])
def test_import_contract_is_kept(contract):
    r = subprocess.run([_lint_imports(), "--no-cache", "--no-logo", "--contract", contract["id"]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{contract['name']}:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
    assert "1 kept, 0 broken" in r.stdout
