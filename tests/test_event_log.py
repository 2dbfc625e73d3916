"""The loop closes through the service: events that reach us only through `POST /v1/events` are kept in the store's
event log (every acknowledged one, beyond the realtime cap), `pinnerformer daily --workdir W` (in another process,
as in production) appends them to the dataset, embeds their day and rebuilds what changed, and the service, after
a reload, serves that day: the new day version's lifelong sequences hold the events, a user who only ever posted
events has vectors, and every acknowledged event is counted in the dataset, exactly once. Re-running `daily` and a
run killed between its append and its cursor commit change nothing; a reused batch id with other events is a 409."""

import datetime as dt
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from tests.test_service import AUTH, TOKEN, build_workdir


@pytest.fixture(scope="module")
def loop_workdir(tmp_path_factory):
    """A work directory of its own: the daily job grows its dataset."""
    return build_workdir(tmp_path_factory.mktemp("loop"))


def daily_cli(workdir, *extra):
    return subprocess.run([sys.executable, "-m", "pinnerformer.cli", "daily", "--workdir", str(workdir),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=600)


def test_events_posted_on_a_day_are_in_the_next_days_dataset_snapshot_and_served_day(loop_workdir):
    from fastapi.testclient import TestClient

    from pinnerformer.data.dataset import Dataset
    from pinnerformer.serving.app import ServiceSettings, create_app
    from pinnerformer.serving.engine import version_end
    from pinnerformer.serving.server import build_service

    w = loop_workdir
    before = Dataset.open(w / "dataset").manifest
    service = build_service(w, str(w / "store"), TOKEN, ServiceSettings(batch_wait_ms=0), log=lambda s: None)
    b = service.bundle
    served_day = service.state[1][:10]
    day = dt.date.fromisoformat(served_day) + dt.timedelta(days=1)  # the day after the served one
    t0 = version_end(service.state[1]) + 3600
    rng = np.random.default_rng(0)
    posted = []  # (user, item, action, time): everything the service acknowledged
    acknowledged = 0
    with TestClient(create_app(service)) as client:
        new_user = "900010"  # a user the dataset has never seen
        for k in range(12):
            users = [b.user_ids[k % 5], new_user] if k % 3 == 0 else [b.user_ids[k % 5]]
            batch = []
            for j, u in enumerate(users):
                for m in range(3):
                    e = {"user": u, "item": b.item_ids[int(rng.integers(len(b.item_ids)))],
                         "action": ["click", "save", "view"][m], "time": t0 + 600 * k + 10 * j + m}
                    batch.append(e)
            r = client.post("/v1/events", json={"events": batch, "batch_id": f"day-{k}"}, headers=AUTH)
            assert r.status_code == 200, r.text
            acknowledged += r.json()["appended"]
            posted += [(e["user"], e["item"], e["action"], e["time"]) for e in batch]
            if k == 4:  # the client retries a batch whose answer it lost: applied once
                again = client.post("/v1/events", json={"events": batch, "batch_id": f"day-{k}"}, headers=AUTH)
                assert again.status_code == 200 and again.json()["duplicate_batch"] is True
                other = client.post("/v1/events", json={"events": batch[:1], "batch_id": f"day-{k}"}, headers=AUTH)
                assert other.status_code == 409 and "applied with other events" in other.text
                scoped = client.post("/v1/events", json={"events": batch[:1], "batch_id": f"day-{k}",
                                                         "client": "another-app"}, headers=AUTH)
                assert scoped.status_code == 200 and scoped.json()["appended"] == 1
                acknowledged += 1
                posted.append(posted[-len(batch)])
        r = client.post("/v1/events", json={"events": [{**batch[0], "user": "not-a-number"}]}, headers=AUTH)
        assert r.status_code == 400 and "not an integer, and the dataset's user ids are" in r.text
        assert acknowledged == len(posted) == 12 * 3 + 4 * 3 + 1

        # the daily job, in its own process, while the service keeps the store open
        run = daily_cli(w, "--until", (day + dt.timedelta(days=1)).isoformat())
        assert run.returncode == 0, run.stderr
        assert f"{acknowledged:,} events" in run.stderr and f"daily {day}" in run.stderr

        after = Dataset.open(w / "dataset")
        record = after.manifest.lineage[-1]
        # the one event the other client repeated is an exact duplicate of an acknowledged one: counted as removed
        assert record.events + record.duplicates_removed == acknowledged and record.duplicates_removed == 1
        assert after.manifest.n_events == before.n_events + record.events and record.new_users == 1
        got = after.events()
        users = after.users["user_id"].cast(pl.String).to_list()
        items = after.items["item_id"].cast(pl.String).to_list()
        actions = after.manifest.action_names()
        rows = set(zip((users[u] for u in got["user"]), (items[i] for i in got["item"]),
                       (actions[a] for a in got["action"]), got["ts"].to_list()))
        assert set(posted) <= rows  # every acknowledged event is in the dataset
        assert (w / "snapshots" / day.isoformat()).is_dir()

        # the service hands over to the new day: the events moved from the realtime list into the lifelong blob
        swap = client.post("/v1/admin/reload", headers=AUTH)
        assert swap.status_code == 200 and swap.json()["now"]["day"].startswith(day.isoformat()), swap.text
        vectors, life = service.store.daily(new_user)
        assert set(vectors) == {"retrieval", "ranking"}
        mine = sorted((e[1], e[3]) for e in posted if e[0] == new_user)
        assert sorted((b.item_ids[int(x["item"])], int(x["ts"])) for x in life) == mine
        emb = client.get(f"/v1/users/{new_user}/embedding", headers=AUTH).json()
        assert set(emb["vectors"]) == {"retrieval", "ranking"}
        ranked = client.post("/v1/rank", json={"user": new_user, "items": b.item_ids[:5],
                                               "time": version_end(service.state[1]) + 60}, headers=AUTH)
        assert ranked.status_code == 200 and ranked.json()["versions"]["day"] == service.state[1]

    # nothing new in the log: a second run changes nothing
    fingerprint = after.manifest.fingerprint
    again = daily_cli(w, "--until", (day + dt.timedelta(days=1)).isoformat())
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert Dataset.open(w / "dataset").manifest.fingerprint == fingerprint
    service.store.close()


def test_a_daily_run_killed_before_its_cursor_commit_appends_nothing_twice(loop_workdir, tmp_path):
    """The export is written and appended, the run dies before the cursors move: the next run takes the same
    entries again, and the dataset ends the same as after one clean run."""
    import shutil

    from pinnerformer.daily import run_daily_from_store
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.serving.event_log import export_log, log_entries
    from pinnerformer.serving.store import events
    from pinnerformer.serving.stores import open_store

    w = tmp_path / "w"
    shutil.copytree(loop_workdir / "dataset", w / "dataset")
    ds = Dataset.open(w / "dataset")
    t = ds.manifest.time_max + 86400
    day = dt.datetime.fromtimestamp(t, dt.timezone.utc).date()
    store = open_store(str(w / "store"))
    users = ds.users["user_id"].cast(pl.String).to_list()[:3]
    items = ds.items["item_id"].cast(pl.String).to_list()[:4]
    rows = [(u, items[k], "click", t + 5 * k + j, None, 1.5) for j, u in enumerate(users) for k in range(4)]
    store.append({u: events(np.arange(4), np.zeros(4), t + np.arange(4)) for u in users},
                 log=log_entries(rows, t, "default", None))
    store.close()
    before = ds.manifest.n_events

    def run():
        return run_daily_from_store(loop_workdir / "run", w / "dataset", str(w / "store"), w / "snapshots",
                                    w / "index", before=day + dt.timedelta(days=1), log=lambda s: None,
                                    progress=False)

    store = open_store(str(w / "store"))
    killed = export_log(store, w / "event-log", day + dt.timedelta(days=1), log=lambda s: None)
    store.close()
    assert killed.events == 12 and killed.days == [day.isoformat()]
    report = run()  # the first run "died" after exporting; this one exports the same entries and appends them
    assert report.log_export.events == 12 and Dataset.open(w / "dataset").manifest.n_events == before + 12
    assert run() is None  # the cursors moved: nothing new
    # killed after the append, before the commit: the cursors are put back; the re-run appends nothing twice
    (w / "event-log" / "cursors.json").unlink()
    report = run()
    assert not report.appended and Dataset.open(w / "dataset").manifest.n_events == before + 12
    assert Dataset.open(w / "dataset").manifest.lineage[-1].events == 12


def test_daily_names_what_is_missing_and_refuses_a_store_that_is_not_there(loop_workdir, tmp_path):
    from tests.conftest import run_cli

    r = run_cli("daily", "--run", loop_workdir / "run", "--dataset", loop_workdir / "dataset", "--snapshot-root",
                tmp_path / "s", "--index", tmp_path / "i")
    assert r.exit_code == 2 and "no new events named: give --input FILE --format F, or --from-store" in r.stderr
    r = run_cli("daily", "--workdir", loop_workdir, "--from-store", tmp_path / "typo")
    assert r.exit_code == 2 and f"--from-store {tmp_path / 'typo'}: no LMDB store there" in r.stderr
    assert not (tmp_path / "typo").exists()  # not created empty
    r = run_cli("daily", "--workdir", loop_workdir, "--input", tmp_path / "x.csv", "--from-store", tmp_path)
    assert r.exit_code == 2 and "--input and --from-store both given" in r.stderr
    r = run_cli("daily", "--dataset", loop_workdir / "dataset")
    assert r.exit_code == 2 and "--run is required (or --workdir, whose run it then is)" in r.stderr
    assert "Traceback" not in r.output
