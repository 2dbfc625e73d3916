"""Growing datasets and the daily loop: `data append` keeps every index, records the lineage and refuses what would
silently change the past; a model trained on an older version serves the newer one; `pinnerformer daily` replayed
day by day on real data gives, each day, exactly the snapshot that embedding the whole grown dataset as of that
day gives."""

import datetime as dt
import json

import numpy as np
import polars as pl
import pytest

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.data.clock import day_start_ts
from pinnerformer.data.synthetic import planted_interest_log
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import Snapshot
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import retrieval_loop


def split_log(tmp_path, at: float = 0.8):
    log = planted_interest_log(n_users=300)
    t = log["timestamp"].sort()[int(at * log.height)]
    log.filter(pl.col("timestamp") < t).write_csv(tmp_path / "old.csv")
    log.filter(pl.col("timestamp") >= t).write_csv(tmp_path / "new.csv")
    log.write_csv(tmp_path / "all.csv")
    return log


def events(cli, cmd, src, *args):
    return cli("data", cmd, *args, "-f", "events", "-i", src, "--action-col", "action")


def test_append_keeps_indexes_records_lineage_and_equals_one_prepare(cli, tmp_path):
    log = split_log(tmp_path)
    assert events(cli, "prepare", tmp_path / "old.csv", "-o", tmp_path / "ds", "--positive", "click").exit_code == 0
    assert events(cli, "prepare", tmp_path / "all.csv", "-o", tmp_path / "full", "--positive", "click").exit_code == 0
    before = Dataset.open(tmp_path / "ds")
    old_users, old_items = before.users["user_id"].to_list(), before.items["item_id"].to_list()
    r = events(cli, "append", tmp_path / "new.csv", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    ds, full = Dataset.open(tmp_path / "ds"), Dataset.open(tmp_path / "full")
    m = ds.manifest
    assert ds.users["user_id"].to_list()[:len(old_users)] == old_users  # append-only id maps
    assert ds.items["item_id"].to_list()[:len(old_items)] == old_items
    new_users = sorted(set(log["user"].to_list()) - set(old_users))
    assert ds.users["user_id"].to_list()[len(old_users):] == new_users  # new ids after, in sorted order
    assert m.ancestors == [before.manifest.fingerprint] and m.descends_from(before.manifest.fingerprint)
    rec = m.lineage[0]
    assert (rec.parent_fingerprint, rec.events, rec.new_users, rec.late_events) == (
        before.manifest.fingerprint, tmp_path.joinpath("new.csv").read_text().count("\n") - 1, len(new_users), 0)
    # the same events as one prepare of the whole log: per user id, the same actions in the same order
    assert (m.n_events, m.n_users, m.n_items) == (full.manifest.n_events, full.manifest.n_users, full.manifest.n_items)
    as_ids = lambda d: d.events().join(d.users, on="user").join(d.items.select("item", "item_id"), on="item").select(
        "user_id", "item_id", "action", "ts").sort("user_id", "ts", maintain_order=True)  # noqa: E731
    assert as_ids(ds).equals(as_ids(full))
    # the same file again is recognised; the past is refused unless asked for, and then counted
    r = events(cli, "append", tmp_path / "new.csv", tmp_path / "ds")
    assert r.exit_code == 0 and "already in" in r.stderr and Dataset.open(tmp_path / "ds").manifest == m
    late = log.filter(pl.col("timestamp") < log["timestamp"].max()).tail(3).with_columns(pl.col("item") + 1000)
    late.write_csv(tmp_path / "late.csv")
    r = events(cli, "append", tmp_path / "late.csv", tmp_path / "ds")
    assert r.exit_code == 2 and "3 event(s) are older than the dataset's last event" in r.stderr
    assert Dataset.open(tmp_path / "ds").manifest == m  # nothing changed
    r = events(cli, "append", tmp_path / "late.csv", tmp_path / "ds", "--allow-late")
    assert r.exit_code == 0, r.output
    m2 = Dataset.open(tmp_path / "ds").manifest
    assert m2.lineage[-1].late_events == 3 and m2.lineage[-1].new_items == 3 and m2.n_items == m.n_items + 3
    assert m2.ancestors == [before.manifest.fingerprint, m.fingerprint]
    r = events(cli, "append", tmp_path / "new.csv", tmp_path / "ds", "--positive", "skip")
    assert r.exit_code == 2 and "the dataset's positive actions apply" in r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,timestamp,action\n1,2,1700000000,purchase\n")
    r = events(cli, "append", bad, tmp_path / "ds")
    assert r.exit_code == 2 and "unknown action value" in r.stderr


def test_a_model_trained_on_an_older_version_serves_the_newer_one(cli, tmp_path):
    split_log(tmp_path, at=0.7)
    assert events(cli, "prepare", tmp_path / "old.csv", "-o", tmp_path / "ds", "--positive", "click").exit_code == 0
    cfg = load_config("small", overrides=json.loads(json.dumps({**TINY, "optim": {**TINY["optim"], "max_epochs": 1}})))
    retrieval_loop(Dataset.open(tmp_path / "ds"), cfg, tmp_path / "run", log=lambda s: None).fit(progress=False,
                                                                                                 max_steps=5)
    day = dt.date(2020, 10, 20)
    before = DailyJob(tmp_path / "run", Dataset.open(tmp_path / "ds"), day, tmp_path / "s1").run(
        log=lambda s: None, progress=False)
    # new items (ids 1000+) and new users (ids 5000+) arrive
    new = pl.read_csv(tmp_path / "new.csv")
    new = pl.concat([new, new.head(20).with_columns(pl.col("item") + 1000, pl.col("user") + 5000)])
    new.write_csv(tmp_path / "new2.csv")
    old = Dataset.open(tmp_path / "ds")
    unseen_users, unseen_items = set(new["user"]) - set(old.users["user_id"]), set(new["item"]) - set(old.items["item_id"])
    assert events(cli, "append", tmp_path / "new2.csv", tmp_path / "ds").exit_code == 0
    ds = Dataset.open(tmp_path / "ds")
    after = DailyJob(tmp_path / "run", ds, day, tmp_path / "s2").run(log=lambda s: None, progress=False)
    assert len(unseen_items) >= 10 and len(unseen_users) >= 1
    assert after.unseen == {"users": len(unseen_users), "items": len(unseen_items)}
    assert before.unseen == {"users": 0, "items": 0}
    # users whose actions did not change keep their vectors bit for bit
    s1, s2 = Snapshot.open(tmp_path / "s1" / day.isoformat()), Snapshot.open(tmp_path / "s2" / day.isoformat())
    unchanged = np.setdiff1d(s1.users, np.unique(ds.events().filter(pl.col("ts") >= ds.manifest.lineage[0].time_min)[
        "user"].to_numpy()))
    assert len(unchanged) > 10
    rows1, rows2 = np.searchsorted(s1.users, unchanged), np.searchsorted(s2.users, unchanged)
    assert s1.vectors[rows1].tobytes() == s2.vectors[rows2].tobytes()
    assert np.isfinite(s2.vectors).all() and s2.manifest.users == len(np.unique(ds.events()["user"]))
    # a dataset that does not descend from the training one is refused, as before
    assert events(cli, "prepare", tmp_path / "all.csv", "-o", tmp_path / "other", "--positive", "click").exit_code == 0
    r = cli("embed", "-r", tmp_path / "run", "-d", tmp_path / "other", "--as-of", day.isoformat(), "-o", tmp_path / "x")
    assert r.exit_code == 2 and "does not descend from it" in r.stderr


@pytest.mark.shared_data
def test_daily_replayed_day_by_day_equals_embedding_the_grown_dataset(shared_data, tmp_path, cli):
    src = shared_data / "movielens-1m-subset"
    lines = (src / "ratings.dat").read_text(encoding="latin-1").splitlines()
    ts = np.array([int(x.rsplit("::", 1)[1]) for x in lines])
    days = [dt.date(2000, 12, 1) + dt.timedelta(days=i) for i in range(7)]

    def folder(name: str, keep) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "ratings.dat").write_text("\n".join(x for x, k in zip(lines, keep) if k) + "\n",
                                                     encoding="latin-1")
        (tmp_path / name / "movies.dat").write_bytes((src / "movies.dat").read_bytes())

    folder("base", ts < day_start_ts(days[0]))
    for d in days:
        folder(d.isoformat(), (ts >= day_start_ts(d)) & (ts < day_start_ts(d + dt.timedelta(days=1))))
    assert cli("data", "prepare", "-f", "movielens", "-i", tmp_path / "base", "-o", tmp_path / "ds").exit_code == 0
    cfg = load_config("small", overrides=json.loads(json.dumps(TINY)))
    retrieval_loop(Dataset.open(tmp_path / "ds"), cfg, tmp_path / "run", log=lambda s: None).fit(progress=False,
                                                                                                 max_steps=10)
    reports = []
    for d in days:
        r = cli("daily", "-r", tmp_path / "run", "-d", tmp_path / "ds", "-i", tmp_path / d.isoformat(), "-f",
                "movielens", "--snapshot-root", tmp_path / "snaps", "--index", tmp_path / "index", "--no-progress")
        assert r.exit_code == 0, r.output
        reports.append(" ".join(r.stderr.split()))
    ds = Dataset.open(tmp_path / "ds")
    assert len(ds.manifest.lineage) == 7 and ds.manifest.n_events == int((ts < day_start_ts(days[-1]) + 86400).sum())
    for i, d in enumerate(days):
        daily = Snapshot.open(tmp_path / "snaps" / d.isoformat())
        whole = DailyJob(tmp_path / "run", ds, d, tmp_path / f"whole-{d}").run(log=lambda s: None, progress=False)
        assert whole.carried_over == 0 and daily.manifest.content_sha256 == whole.content_sha256, d
        if i:  # incremental: only the users with an action after the previous snapshot's last input were computed
            since = Snapshot.open(tmp_path / "snaps" / days[i - 1].isoformat()).manifest.data_time_max
            active = ds.events().filter((pl.col("ts") >= since) & (pl.col("ts") < day_start_ts(d) + 86400))
            assert since < day_start_ts(d) and daily.manifest.recomputed == active["user"].n_unique()
            assert daily.manifest.carried_over > 0
        assert f"daily {d}: appended" in reports[i]
    assert "index rebuilt (no index yet)" in reports[0]
    # a second run of the same day does nothing new: already appended, snapshot complete, index kept
    r = cli("daily", "-r", tmp_path / "run", "-d", tmp_path / "ds", "-i", tmp_path / days[-1].isoformat(), "-f",
            "movielens", "--snapshot-root", tmp_path / "snaps", "--index", tmp_path / "index", "--no-progress")
    assert r.exit_code == 0 and "already appended" in r.stderr and "is already complete" in r.stderr
    assert "index kept" in " ".join(r.stderr.split()) and Dataset.open(tmp_path / "ds").manifest == ds.manifest


def test_a_day_embedded_before_all_its_events_arrived_is_recomputed(cli, tmp_path):
    log = planted_interest_log(n_users=300)
    day = dt.date(2020, 9, 25)
    noon = day_start_ts(day) + 12 * 3600
    log.filter(pl.col("timestamp") < noon).write_csv(tmp_path / "morning.csv")
    log.filter(pl.col("timestamp") >= noon).write_csv(tmp_path / "rest.csv")
    assert events(cli, "prepare", tmp_path / "morning.csv", "-o", tmp_path / "ds", "--positive", "click").exit_code == 0
    cfg = load_config("small", overrides=json.loads(json.dumps(TINY)))
    retrieval_loop(Dataset.open(tmp_path / "ds"), cfg, tmp_path / "run", log=lambda s: None).fit(progress=False,
                                                                                                 max_steps=3)
    early = DailyJob(tmp_path / "run", Dataset.open(tmp_path / "ds"), day, tmp_path / "s").run(
        log=lambda s: None, progress=False)
    assert events(cli, "append", tmp_path / "rest.csv", tmp_path / "ds").exit_code == 0
    ds = Dataset.open(tmp_path / "ds")
    lines = []
    again = DailyJob(tmp_path / "run", ds, day, tmp_path / "s").run(log=lines.append, progress=False)
    afternoon = ds.events().filter((pl.col("ts") >= noon) & (pl.col("ts") < day_start_ts(day) + 86400)).height
    assert afternoon > 0 and any(f"({afternoon:,} since): recomputing it" in x for x in lines), lines
    whole = DailyJob(tmp_path / "run", ds, day, tmp_path / "whole").run(log=lambda s: None, progress=False)
    assert again.content_sha256 == whole.content_sha256 != early.content_sha256
    lines = []
    DailyJob(tmp_path / "run", ds, day, tmp_path / "s").run(log=lines.append, progress=False)
    assert "is already complete" in lines[0]  # and now it is current: nothing to do
