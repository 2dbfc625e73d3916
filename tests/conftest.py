import os
from pathlib import Path

# pytest-xdist (the README's test command runs two workers on two cores): one thread each for torch, OpenMP (FAISS,
# LightGBM) and polars, or the workers' thread pools fight over the cores and the suite is no faster. Set before
# any of them is imported; the subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS",
                 "RAYON_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import pytest
from typer.testing import CliRunner

from pinnerformer.cli import app

SHARED_DATA = Path(os.environ.get("PINNERFORMER_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The public datasets (docs/data.md): skipped with a reason when absent, except in CI where they must be there."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("PINNERFORMER_REQUIRE_SHARED_DATA"):
            pytest.fail(f"PINNERFORMER_REQUIRE_SHARED_DATA is set but {SHARED_DATA} does not exist")
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set PINNERFORMER_SHARED_DATA)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server started by the project's own `serving.redis_server` (skipped with a reason where Debian's
    redis-server is not installed, except in CI: PINNERFORMER_REQUIRE_REDIS=1)."""
    import shutil

    from pinnerformer.serving.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        if os.environ.get("PINNERFORMER_REQUIRE_REDIS") == "1":
            pytest.fail("PINNERFORMER_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def run_cli(*args: str):
    """Invoke the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def cli():
    return run_cli


# A tiny model configuration for tests that train.
TINY = {"data": {"max_len": 16, "positions": 8, "sequences_per_user": 8},
        "model": {"width": 32, "layers": 1, "heads": 2, "dim": 32, "id_dim": 32, "item_tower_hidden": 64},
        "optim": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "max_epochs": 6, "patience": 3},
        "loss": {"n_random": 64}, "eval": {"val_fraction": 0.2, "test_fraction": 0.1}, "checkpoint_every": 5}


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A prepared dataset with planted interest groups (see pinnerformer.data.synthetic)."""
    from pinnerformer.data.synthetic import planted_interest_log

    d = tmp_path_factory.mktemp("planted")
    planted_interest_log(n_users=300, n_items=200, n_groups=10, events_per_user=40).write_csv(d / "log.csv")
    r = run_cli("data", "prepare", "-f", "events", "-i", d / "log.csv", "-o", d / "ds", "--action-col", "action",
                "--positive", "click")
    assert r.exit_code == 0, r.output
    return d / "ds"




PLANTED_DAY = __import__("datetime").date(2020, 9, 25)  # planted timelines run 2020-09-13 .. 2020-10-15


@pytest.fixture(scope="session")
def trained(planted, tmp_path_factory):
    """A tiny run on the planted dataset (2 epochs), trained once per test process: tests that damage it restore
    it, and tests that write beside it (eval/, blend.json) write what any other test would write there."""
    import json

    from pinnerformer.data import Dataset
    from pinnerformer.training.config import load_config
    from pinnerformer.training.retrieval import retrieval_loop

    run = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config("small", overrides=json.loads(json.dumps({**TINY, "optim": {**TINY["optim"], "max_epochs": 2}})))
    retrieval_loop(Dataset.open(planted), cfg, run, log=lambda s: None).fit(progress=False)
    return run
