"""kill -9 at random points of prepare, append, train and embed (three seeds each), then the same command again:
the outputs are identical to an uninterrupted run's, and nothing half-written is left behind or looks complete."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from conftest import PLANTED_DAY as D0
from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.data.synthetic import planted_interest_log
from pinnerformer.inference.snapshot import Snapshot

SEEDS = [0, 1, 2]
CLI = [sys.executable, "-m", "pinnerformer.cli"]


def run(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def startup() -> float:
    """Seconds the command line takes to start (imports), to aim kills at the work after it."""
    t = time.perf_counter()
    run("--version")
    return time.perf_counter() - t


def killed(seed: int, duration: float, *args) -> bool:
    """Start the command, SIGKILL it at a random moment of its expected duration (mostly after its start-up, when
    it works). True if it died by the kill."""
    start = min(startup(), 0.9 * duration)
    delay = start + np.random.default_rng(seed).uniform(0.0, 1.0) * (duration - start)
    p = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + delay
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    return p.wait() == -signal.SIGKILL


def timed(*args) -> float:
    t = time.perf_counter()
    run(*args)
    return time.perf_counter() - t


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".replaced"))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("killlogs")
    log = planted_interest_log(n_users=600, n_items=400, events_per_user=60)
    t = log["timestamp"].sort()[int(0.8 * log.height)]
    log.filter(pl.col("timestamp") < t).write_csv(d / "old.csv")
    log.filter(pl.col("timestamp") >= t).write_csv(d / "new.csv")
    return d


def prepare_args(src, out):
    return ["data", "prepare", "-f", "events", "-i", src, "-o", out, "--action-col", "action", "--positive", "click"]


def test_killed_prepare_and_append_rerun_to_identical_datasets(logs, tmp_path):
    took = timed(*prepare_args(logs / "old.csv", tmp_path / "ref"))
    took_append = timed("data", "append", tmp_path / "ref", "-f", "events", "-i", logs / "new.csv", "--action-col",
                        "action")
    ref = Dataset.open(tmp_path / "ref").manifest
    kills = 0
    for seed in SEEDS:
        out = tmp_path / f"ds-{seed}"
        kills += killed(seed, took, *prepare_args(logs / "old.csv", out), "--overwrite")
        assert not out.exists() or Dataset.open(out).manifest.n_events > 0  # absent, or complete
        run(*prepare_args(logs / "old.csv", out), "--overwrite")
        kills += killed(seed + 10, took_append, "data", "append", out, "-f", "events", "-i", logs / "new.csv",
                        "--action-col", "action")
        run("data", "append", out, "-f", "events", "-i", logs / "new.csv", "--action-col", "action")
        m = Dataset.open(out).manifest
        assert m.fingerprint == ref.fingerprint and len(m.lineage) == 1 and m.n_events == ref.n_events
        assert leftovers(tmp_path) == []
    assert kills >= 3  # most attempts really were killed mid-way


def test_killed_training_resumes_to_the_identical_run(logs, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({**TINY, "checkpoint_every": 3}))
    run(*prepare_args(logs / "old.csv", tmp_path / "ds"))
    train = ["train", "-d", tmp_path / "ds", "--config", tmp_path / "cfg.json", "--max-steps", "14", "--no-progress"]
    took = timed(*train, "-o", tmp_path / "ref")
    ref = (tmp_path / "ref" / "metrics.jsonl").read_text()
    for seed in SEEDS:
        out = tmp_path / f"run-{seed}"
        killed(seed, took, *train, "-o", out)
        if (out / "config.json").exists():
            run(*train, "-o", out, "--resume")
        else:  # killed before the run existed: start it
            run(*train, "-o", out)
        assert (out / "metrics.jsonl").read_text() == ref
        assert json.loads((out / "summary.json").read_text())["steps"] == 14
        assert leftovers(out) == []


def test_killed_embed_reruns_to_the_identical_snapshot(trained, planted, tmp_path):
    args = ["embed", "-r", trained, "-d", planted, "--as-of", D0.isoformat(), "--shard-users", "5", "--no-progress"]
    took = timed(*args, "-o", tmp_path / "ref")
    ref = Snapshot.open(tmp_path / "ref" / D0.isoformat()).manifest.content_sha256
    for seed in SEEDS:
        root = tmp_path / f"s-{seed}"
        killed(seed, took, *args, "-o", root)
        assert not (root / D0.isoformat()).exists() or Snapshot.open(root / D0.isoformat()).verify() is None
        run(*args, "-o", root)
        assert Snapshot.open(root / D0.isoformat()).manifest.content_sha256 == ref
        assert sorted(p.name for p in root.iterdir()) == [D0.isoformat()]


def tensors_sha(rank_dir) -> str:
    from pinnerformer.io import load_checkpoint

    return load_checkpoint(rank_dir / "pinnerformer" / "checkpoints" / "best.pt")["tensors_sha256"]


def test_killed_rank_prepare_and_rank_train_rerun_to_identical_outputs(tmp_path):
    """The ranking data (with the PinnerFormer trained for its feature) and a ranker's run, killed at random points:
    a rerun gives the same tables, vectors and training log as an uninterrupted run."""
    from pinnerformer.data.synthetic import planted_request_log

    planted_request_log(n_users=120, days=8).write_csv(tmp_path / "log.csv")
    run("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
        "action", "--positive", "click,save")
    prep = ["rank", "prepare", "--dataset", tmp_path / "ds", "--heads", "save=save", "--request", "session",
            "--pf-max-steps", "20"]
    took = timed(*prep, "--output", tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    ref_vectors = (tmp_path / "ref" / "user_vectors.npy").read_bytes()
    for seed in SEEDS:
        out = tmp_path / f"rank-{seed}"
        killed(seed, took, *prep, "--output", out, "--overwrite")
        assert not out.exists() or (out / "manifest.json").exists()  # absent, or complete
        run(*prep, "--output", out, "--overwrite")
        m = json.loads((out / "manifest.json").read_text())
        assert m["fingerprint"] == ref["fingerprint"] and m["splits"] == ref["splits"]
        # the feature's PinnerFormer: the same weights (its file's bytes name the temporary file it was saved as)
        assert tensors_sha(out) == tensors_sha(tmp_path / "ref")
        assert (out / "user_vectors.npy").read_bytes() == ref_vectors
        assert leftovers(tmp_path) == []
    (tmp_path / "cfg.json").write_text(json.dumps({
        "checkpoint_every": 3, "optim": {"batch_size": 64, "warmup_steps": 5},
        "data": {"epoch_rows": 2000, "max_val_requests": 100},
        "model": {"transact": {"seq_len": 8}, "mlp": [32], "item_id_dim": 4}}))
    train = ["rank", "train", "--data", tmp_path / "ref", "--config", tmp_path / "cfg.json", "--max-steps", "12",
             "--no-progress"]
    took = timed(*train, "-o", tmp_path / "run-ref")
    ref_log = (tmp_path / "run-ref" / "metrics.jsonl").read_text()
    for seed in SEEDS:
        out = tmp_path / f"run-{seed}"
        killed(seed, took, *train, "-o", out)
        run(*train, "-o", out, *(["--resume"] if (out / "config.json").exists() else []))
        assert (out / "metrics.jsonl").read_text() == ref_log
        assert leftovers(out) == []
