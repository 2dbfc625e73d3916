import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pinnerformer.cli import app

SHARED_DATA = Path(os.environ.get("PINNERFORMER_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data: skipped with a reason when absent, except in CI where it must be there."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("PINNERFORMER_REQUIRE_SHARED_DATA"):
            pytest.fail(f"PINNERFORMER_REQUIRE_SHARED_DATA is set but {SHARED_DATA} does not exist")
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set PINNERFORMER_SHARED_DATA)")
    return SHARED_DATA.resolve()


def run_cli(*args: str):
    """Invoke the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def cli():
    return run_cli
