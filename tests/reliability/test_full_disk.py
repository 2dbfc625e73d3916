"""A full disk while writing (simulated with a file-size limit: writes beyond it fail with EFBIG, as they fail with
ENOSPC on a full disk): a message and exit 2, no traceback, and nothing half-written that looks complete."""

import subprocess
import sys

from conftest import PLANTED_DAY as D0
from pinnerformer.data.synthetic import planted_interest_log

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from pinnerformer.cli import app
sys.argv = ["pinnerformer", *sys.argv[2:]]
app()
"""


def limited(limit_bytes: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit_bytes), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_prepare_and_embed_on_a_full_disk(trained, planted, tmp_path):
    planted_interest_log(n_users=3000, events_per_user=40).write_csv(tmp_path / "log.csv")
    r = limited(200_000, "data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds",
                "--action-col", "action", "--positive", "click")
    assert r.returncode == 2 and "File too large" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == [tmp_path / "log.csv"]
    r = limited(20_000, "embed", "-r", trained, "-d", planted, "--as-of", D0.isoformat(), "-o", tmp_path / "snaps",
                "--no-progress")
    assert r.returncode == 2 and "File too large" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "snaps" / D0.isoformat()).exists()  # staged, never published
