"""The package's structure, checked with import-linter (contracts in pyproject.toml): layers that only point
down, measure/hub/analysis never importing train or cli, no import cycle inside any subpackage -- and the
contracts really fail when an upward import (a cycle) is reintroduced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([exe, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_contracts_fail_on_a_reintroduced_cycle(tmp_path):
    """A copy of the package where a bottom layer imports the command line (a cycle through the whole
    package): lint-imports exits non-zero and names the offending import."""
    shutil.copytree(ROOT / "vit2cbsa", tmp_path / "vit2cbsa", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layout = tmp_path / "vit2cbsa" / "layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _cycle():\n    from .cli import main  # noqa: F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "vit2cbsa layers point down BROKEN" in result.stdout
    assert "vit2cbsa.layout -> vit2cbsa.cli" in result.stdout
