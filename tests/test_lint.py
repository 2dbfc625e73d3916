"""The pyflakes-class checks (names that do not resolve, unused imports, syntax errors) over every Python tree we ship.

The rule set lives in pyproject.toml ([tool.ruff.lint]); ruff is pinned in the [dev] extra.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["src", "tests", "scripts", "bench", "examples"]


def _ruff() -> list[str]:
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -e '.[dev]')")
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing():
    out = subprocess.run([*_ruff(), "check", "--no-cache", *TREES], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_catches_an_undefined_name(tmp_path):
    # The check above could pass by checking nothing; this one shows the configured rules do fire.
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    out = subprocess.run([*_ruff(), "check", "--no-cache", str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1
    assert "F821" in out.stdout and "F401" in out.stdout
