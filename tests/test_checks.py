"""The code's own checks, run with the suite: mypy (strict, mypy.ini) on the package, ruff on everything."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT


def test_the_package_type_checks() -> None:
    """mypy finds nothing in chatapp/ (every `# type: ignore` left there names its reason)."""
    result = subprocess.run([sys.executable, "-m", "mypy", "chatapp"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing() -> None:
    """ruff check (ruff.toml) is clean on the package, the tests and bench/."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
