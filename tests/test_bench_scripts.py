"""The GPU issue's one-call script (bench/gpu_all.sh), dry-run on the CPU at toy sizes: a session lent a GPU has
about 15 minutes in all, so the script must not first fail on the card. Each part's JSON has to come back in the
archive, parse, and say the request gave the same answer on every call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, *parts: str, deadline: int = 3000) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path / "out"), PART_TIMEOUT="600", DEADLINE=str(deadline))
    # `python3` inside the script must be this interpreter (the one with the package's dependencies)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "python3"  # a wrapper, not a symlink: a venv is found from the interpreter's own path
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "bench/gpu_all.sh", *parts], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def archive(tmp_path: Path) -> dict[str, str]:
    with tarfile.open(tmp_path / "out" / "gpu-logs.tgz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_v2_part_brings_back_every_path_with_and_without_the_model(tmp_path):
    proc = run_script(tmp_path, "v2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed" not in proc.stdout and "stopped" not in proc.stdout and "skipped" not in proc.stdout
    files = archive(tmp_path)
    assert set(files) == {"v2-naive.json", "v2-dedup.json", "v2-fused.json", "v2-dedup-model.json",
                          "v2-fused-model.json"}
    for name, text in files.items():
        report = json.loads(text.strip().splitlines()[-1])
        assert report["device"] == "cpu" and report["candidates"] == 16 and report["length"] == 256, name
        assert report["with_model"] == name.endswith("-model.json"), name
        assert report["repeatable"] is True, name
        assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"], name
    # the logs folder is packed and removed: only the archive comes back
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu-logs.tgz"]


def test_unknown_part_is_refused_by_name(tmp_path):
    proc = run_script(tmp_path, "trian")
    assert proc.returncode == 2
    assert "unknown part trian" in proc.stdout


def test_processes_past_the_deadline_are_skipped_and_the_call_marked_failed(tmp_path):
    """With less than 20 s left before DEADLINE no benchmark starts (the device call would be killed mid-run and
    bring back nothing): each is named as skipped, the archive is still packed, the exit status says so."""
    proc = run_script(tmp_path, "v2", deadline=5)
    assert proc.returncode == 1
    assert proc.stdout.count("skipped, ") == 5
    assert "--path naive" in proc.stdout and "--path fused --model" in proc.stdout
    assert set(archive(tmp_path)) == {"v2-naive.json", "v2-dedup.json", "v2-fused.json", "v2-dedup-model.json",
                                      "v2-fused-model.json"}  # each holds the line saying it was skipped
