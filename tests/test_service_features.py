"""The service's point-in-time features count the events posted since its day version, on both stores (embedded
LMDB and a real Redis): after `POST /v1/events`, `POST /v1/rank` gives the feature values and the scores `rank
score` gives on the dataset grown by those very events (the store's event log exported and appended, as the daily
job does), for a user of the dataset and for a new one, with a retried batch, a duplicate event and events after
the request in the mix; the user x item, interest and window features move (the static features alone would
differ); and a hand-over drops the counters of the days the new version's dataset holds."""

import datetime as dt

import numpy as np
import polars as pl
import pytest

from tests.test_service import AUTH, TOKEN, build_workdir

HOUR = 3600
DAY_PLUS = 86400 + 5 * HOUR  # the last batch's events: the day after the day version's end


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A work directory of its own (its dataset grows), whose items have interests (two each)."""
    d = tmp_path_factory.mktemp("online-features")
    pl.DataFrame({"item": list(range(200)), "interests": [f"g{i % 10}|p{i % 3}" for i in range(200)]}).write_csv(
        d / "items.csv")
    return build_workdir(d, prepare_args=("--items", d / "items.csv", "--items-interests-col", "interests"))


def posted_events(b, E: int) -> list[list[dict]]:
    """Batches of events from the day version's end E on: the user under test on candidates and on items of their
    interests, other users on the candidates, a new user, events after the request time."""
    rng = np.random.default_rng(0)
    me, new = b.user_ids[3], "900123"
    others = [b.user_ids[k] for k in (10, 20, 33)]
    cands = b.item_ids[5:25]
    batches = []
    for k in range(8):
        batch = [{"user": me, "item": cands[k % 4], "action": ["click", "save", "view"][k % 3],
                  "time": E + HOUR + 600 * k}]
        batch += [{"user": u, "item": cands[int(rng.integers(20))], "action": "click",
                   "time": int(E + rng.integers(14 * HOUR))} for u in others]
        batch.append({"user": new, "item": b.item_ids[40 + k], "action": "click", "time": E + 2 * HOUR + k})
        batch.append({"user": me, "item": b.item_ids[60 + 10 * k], "action": "view", "time": E + 16 * HOUR + k})
        batches.append(batch)
    batches.append([{"user": u, "item": cands[0], "action": "save", "time": E + DAY_PLUS} for u in others])
    return batches


def test_rank_counts_the_events_posted_since_the_day_version_as_rank_score_counts_the_grown_dataset(
        workdir, redis_server, tmp_path):
    import redis
    from fastapi.testclient import TestClient

    from pinnerformer.data.append import append
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.data.formats import read_source
    from pinnerformer.features.point_in_time import Queries, feature_table
    from pinnerformer.features.rank_features import rank_event_log
    from pinnerformer.ranking.score import score_request
    from pinnerformer.serving import engine as eng
    from pinnerformer.serving.app import ServiceSettings, create_app
    from pinnerformer.serving.event_log import events_options, export_log
    from pinnerformer.serving.server import build_service
    from pinnerformer.serving.store_lmdb import LmdbStore

    redis.Redis.from_url(redis_server.url).flushdb()
    services = {name: build_service(workdir, url, TOKEN, ServiceSettings(batch_wait_ms=0), log=lambda s: None)
                for name, url in (("lmdb", str(tmp_path / "store")), ("redis", redis_server.url))}
    b, version = services["lmdb"].snapshot()
    E = eng.version_end(version)
    t = E + 15 * HOUR  # the request: after most events, before some; its day is E's (the same vector offline)
    me, new = b.user_ids[3], "900123"
    cands = b.item_ids[5:25]
    codes = np.array([b.item_code[x] for x in cands])
    later = [E + DAY_PLUS + HOUR, E + 9 * 86400]  # features only: the 1-day window past E's day, 7 days on
    batches = posted_events(b, E)
    online, served = {}, {}
    for name, service in services.items():
        with TestClient(create_app(service)) as client:
            for k, batch in enumerate(batches):
                r = client.post("/v1/events", json={"events": batch, "batch_id": f"b{k}"}, headers=AUTH)
                assert r.status_code == 200 and r.json()["appended"] == len(batch), r.text
            again = client.post("/v1/events", json={"events": batches[2], "batch_id": "b2"}, headers=AUTH)
            assert again.json()["duplicate_batch"] is True  # a retry: applied once
            dup = client.post("/v1/events", json={"events": batches[3][:1]}, headers=AUTH)  # no id: stored again
            assert dup.json()["appended"] == 1
            for user in (me, new):
                r = client.post("/v1/rank", json={"user": user, "items": cands, "time": t}, headers=AUTH)
                assert r.status_code == 200, r.text
                served[name, user] = r.json()["items"]
            requests = [eng.RankRequest(u, codes, tt, 0) for u in (me, new) for tt in [t] + later]
            online[name] = eng.request_features(b, service.store, requests, version)
            static = eng.request_features(b, service.store, requests, None)  # the version's log alone
        assert np.array_equal(online[name].values, online["lmdb"].values)  # both stores: the same counters
        service.store.close()

    # the union: the dataset grown by the store's own event log (exported and appended, as the daily job does)
    store = LmdbStore(tmp_path / "store")
    exported = export_log(store, tmp_path / "event-log", dt.date.fromisoformat(version[:10]) + dt.timedelta(days=3),
                          log=lambda s: None)
    store.close()
    m = Dataset.open(workdir / "dataset").manifest
    append(workdir / "dataset", read_source("events", exported.path, events_options(
        m.action_names(), [a.name for a in m.actions if a.positive], "int")), allow_late=True, log=lambda s: None)
    grown = Dataset.open(workdir / "dataset")
    assert grown.manifest.n_events == m.n_events + sum(map(len, batches))  # the duplicate removed, as counted
    users = grown.users["user_id"].cast(pl.String).to_list()
    rd = b.run.data()
    q = Queries(np.repeat([users.index(me)] * 3 + [users.index(new)] * 3, len(codes)), np.tile(codes, 6),
                np.repeat([t] + later + [t] + later, len(codes)), np.repeat(np.arange(6), len(codes)))
    want = feature_table(rank_event_log(rd, grown), q, b.model.feature_config)
    got = online["redis"]
    assert got.names == want.names
    np.testing.assert_allclose(got.values, want.values, rtol=0, atol=1e-6)
    # the posted events move user x item, interest, window, rate, recency and sequence features: static ones differ
    moved = {n for j, n in enumerate(got.names) if not np.allclose(static.values[:, j], got.values[:, j])}
    for name in ("ui.click", "ui.save", "ui.recency_h", "uint.events", "uint.share", "uint.rate.save",
                 "uint.recency_h", "item.click.1d", "item.save.7d", "item.events.30d", "item.rate.click",
                 "item.recency_h", "user.events.1d", "user.events.all", "user.active_days", "seq.same_item",
                 "seq.same_interest", "req.popularity_rank"):
        assert name in moved, name
    # and the scores: rank score on the grown dataset, the served heads and order on both stores
    for user in (me, new):
        ref = score_request(workdir / "rank-run", user, str(t), cands)
        for name in services:
            got_heads = {x["item"]: x["heads"] for x in served[name, user]}
            for row in ref.iter_rows(named=True):
                for h in ("save", "click"):
                    assert got_heads[row["item_id"]][h] == pytest.approx(row[h], rel=1e-5, abs=1e-7), (name, user)
            assert [x["item"] for x in served[name, user]] == ref["item_id"].to_list()


def test_a_hand_over_drops_the_counters_of_days_before_both_versions_ends(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pinnerformer.serving import daily
    from pinnerformer.serving.store import events
    from pinnerformer.serving.store_lmdb import LmdbStore

    store = LmdbStore(tmp_path / "store")
    day0 = 1_764_892_800  # 2025-12-05
    for d in range(4):
        store.append({"u": events(np.array([1]), np.array([0]), np.array([day0 + d * 86400 + 60]))})
    swapped = []
    service = SimpleNamespace(store=store, snapshot=lambda: (SimpleNamespace(workdir=tmp_path, device=None, version={}),
                                                             "2025-12-06.a.b"),
                              swap=lambda bundle, version: swapped.append(version))
    monkeypatch.setattr(daily.eng, "load_bundle", lambda w, d: SimpleNamespace(version={}, workdir=w))
    monkeypatch.setattr(daily, "ensure_day", lambda bundle, store, workdir, log: "2025-12-07.a.b")
    daily.hand_over(service)
    assert swapped == ["2025-12-07.a.b"]
    # the old version (ending 2025-12-07 00:00) still reads 2025-12-07 on; the new one from 2025-12-08
    left = store.counters(day0, ["u"], [], [day0 + 5 * 86400], 1)
    assert left.users["u"]["ts"].tolist() == [day0 + 2 * 86400 + 60, day0 + 3 * 86400 + 60]
