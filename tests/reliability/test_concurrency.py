"""Two writers at once: two embed jobs on one snapshot root and day (with different checkpoints) never publish a
snapshot mixing their vectors, and never crash; two appends to one dataset never lose one of them."""

import subprocess
import sys

from conftest import PLANTED_DAY as D0
from pinnerformer.data import Dataset
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import Snapshot


def embed(run, ds, root, checkpoint):
    return subprocess.Popen([sys.executable, "-m", "pinnerformer.cli", "embed", "-r", str(run), "-d", str(ds),
                             "--as-of", D0.isoformat(), "-o", str(root), "--checkpoint", checkpoint, "--shard-users",
                             "1", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_embed_jobs_on_one_root_and_day_never_mix(trained, planted, tmp_path):
    ref = {ck: DailyJob(trained, Dataset.open(planted), D0, tmp_path / f"ref-{ck}", checkpoint=ck).run(
        log=lambda s: None, progress=False) for ck in ("best", "last")}
    assert ref["best"].content_sha256 != ref["last"].content_sha256 or \
        ref["best"].checkpoint.sha256 != ref["last"].checkpoint.sha256
    for attempt in range(2):
        root = tmp_path / f"shared-{attempt}"
        a, b = embed(trained, planted, root, "best"), embed(trained, planted, root, "last")
        (_, err_a), (_, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
        codes = sorted([a.returncode, b.returncode])
        snap = Snapshot.open(root / D0.isoformat())
        snap.verify()
        winner = "best" if snap.manifest.checkpoint.name == "best" else "last"
        # exactly one job's snapshot, whole: the same bytes as that checkpoint's job alone
        assert snap.manifest.content_sha256 == ref[winner].content_sha256
        assert codes == [0, 2], (err_a, err_b)
        loser_err = err_b if winner == "best" else err_a
        assert "made by another checkpoint or dtype: use --force" in " ".join(loser_err.split())
        assert "Traceback" not in err_a + err_b
        assert sorted(p.name for p in root.iterdir()) == [D0.isoformat()]


def test_two_appends_at_once_both_land(planted, tmp_path, cli):
    import polars as pl

    from pinnerformer.data.synthetic import planted_interest_log

    log = planted_interest_log(n_users=200, seed=9)
    t = log["timestamp"].sort()[int(0.6 * log.height)]
    log.filter(pl.col("timestamp") < t).write_csv(tmp_path / "base.csv")
    mid = log.filter(pl.col("timestamp") >= t)
    mid.filter(pl.col("user") % 2 == 0).write_csv(tmp_path / "even.csv")
    mid.filter(pl.col("user") % 2 == 1).write_csv(tmp_path / "odd.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "base.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--positive", "click").exit_code == 0
    procs = [subprocess.Popen([sys.executable, "-m", "pinnerformer.cli", "data", "append", str(tmp_path / "ds"), "-f",
                               "events", "-i", str(tmp_path / f"{n}.csv"), "--action-col", "action", "--allow-late"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ("even", "odd")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    m = Dataset.open(tmp_path / "ds").manifest
    assert len(m.lineage) == 2 and m.n_events == log.height  # neither append overwrote the other


def prepared_with_late_events(tmp_path, cli, seed: int):
    """A planted log: its first 70% prepared as tmp_path/ds, the rest written to tmp_path/late.csv to append."""
    import polars as pl

    from pinnerformer.data.synthetic import planted_interest_log

    log = planted_interest_log(n_users=120, seed=seed)
    t = log["timestamp"].sort()[int(0.7 * log.height)]
    log.filter(pl.col("timestamp") < t).write_csv(tmp_path / "base.csv")
    log.filter(pl.col("timestamp") >= t).write_csv(tmp_path / "late.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "base.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--positive", "click").exit_code == 0
    return log


def test_a_reader_never_pairs_one_versions_manifest_with_anothers_files(tmp_path, cli):
    """A Dataset opened before `data append` swaps the folder: what it had loaded stays the old version, and a file it
    had not loaded yet is refused with a clear error instead of being read from the new version under the old
    manifest (the old manifest's n_events beside the new events would be silently wrong). Opened again, it is the
    new version, whole."""
    import pytest

    from pinnerformer.errors import PinnerformerError

    log = prepared_with_late_events(tmp_path, cli, seed=3)
    old = Dataset.open(tmp_path / "ds")
    old_timelines = old.timelines  # loaded (memory-mapped) before the swap
    n_old = old.manifest.n_events
    assert cli("data", "append", tmp_path / "ds", "-f", "events", "-i", tmp_path / "late.csv", "--action-col",
               "action", "--allow-late").exit_code == 0
    assert len(old_timelines.item) == n_old  # still the version its manifest describes
    for read in (lambda: old.events(), lambda: old.items, lambda: old.users):
        with pytest.raises(PinnerformerError, match="was replaced .* after its manifest was read.*open the dataset again"):
            read()
    new = Dataset.open(tmp_path / "ds")
    assert new.manifest.n_events == log.height > n_old
    assert new.events().height == len(new.timelines.item) == new.manifest.n_events
    assert new.items.height == new.manifest.n_items and new.users.height == new.manifest.n_users


def test_a_stable_read_outside_the_lock_is_done_again_on_the_version_a_swap_leaves(tmp_path, cli):
    """`data append` reads the dataset's id types before it takes the writers' lock (and `data stats` never takes
    it): an append by another process may swap the folder in between. That was a failure of one of two concurrent
    appends in CI ("was replaced ... after its manifest was read"). `Dataset.read_stable` does the read again on the
    version now in place; here the swap is planted inside the first read, so the order is certain."""
    log = prepared_with_late_events(tmp_path, cli, seed=4)
    seen = []

    def read(ds):
        if not seen:  # the other process's append lands while this read runs
            assert cli("data", "append", tmp_path / "ds", "-f", "events", "-i", tmp_path / "late.csv", "--action-col",
                       "action", "--allow-late").exit_code == 0
        seen.append(ds.manifest.n_events)
        return ds.events().height, ds.manifest.n_events

    assert Dataset.read_stable(tmp_path / "ds", read) == (log.height, log.height)  # the new version, whole
    assert len(seen) == 2 and seen[0] < seen[1] == log.height
