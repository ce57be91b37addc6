"""The house rules that tools can check: ruff clean everywhere, mypy --strict on the core.

The mypy scope (stack/ and bridge/ except bridge/lab) is pyproject.toml's
[tool.mypy] section; these tests fail the run when either tool finds anything.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed (it is in the test extra)"
    return found


def test_ruff_clean() -> None:
    res = subprocess.run([_tool("ruff"), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_on_the_core() -> None:
    res = subprocess.run([_tool("mypy")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_test_file_names_are_unique() -> None:
    """pytest imports test files by basename (tests/ has no packages): two files of one name
    in different folders stop the whole run at collection, so the suite checks it here."""
    root = Path(__file__).resolve().parents[2] / "tests"
    names: dict[str, list[str]] = {}
    for f in root.rglob("test_*.py"):
        names.setdefault(f.name, []).append(str(f.relative_to(root)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}
