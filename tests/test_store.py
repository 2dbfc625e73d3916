"""The online store's two backends pass the same tests: the embedded LMDB store and Redis (a real redis-server
started by the project's own `serving.redis_server`; skipped with a reason where redis-server is not installed,
required in CI by PINNERFORMER_REQUIRE_REDIS=1). Exact round trips, the realtime cap, idempotent batches, whole-or-
nothing batches, day versions published atomically, the feature counters (exact, each event once), and faults: a
writer killed with -9 in the middle of ingestion loses no acknowledged event and half-applies no batch (nor its
counters); Redis killed and restarted keeps every acknowledged event (append-only file, fsync always), and the
store recovers without being reopened."""

import os
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from pinnerformer.errors import PinnerformerError
from pinnerformer.serving.store import EVENT, StoreUnavailable, events
from pinnerformer.serving.stores import open_store
from pinnerformer.serving.store_lmdb import LmdbStore


@pytest.fixture(params=["lmdb", "redis"])
def make_store(request, tmp_path):
    """A function opening the store under test (again: the same data) with a realtime cap."""
    if request.param == "lmdb":
        return lambda cap=5: LmdbStore(tmp_path / "lmdb", realtime_cap=cap)
    server = request.getfixturevalue("redis_server")
    from pinnerformer.serving.store_redis import RedisStore

    ns = f"t{uuid.uuid4().hex[:8]}"
    return lambda cap=5: RedisStore(server.url, realtime_cap=cap, namespace=ns)


def ev(items, t0=0, action=1):
    n = len(items)
    return events(np.asarray(items), np.full(n, action), t0 + np.arange(n), surface=np.arange(n) % 3,
                  duration=np.linspace(0, 1, n))


def test_events_round_trip_exactly_and_the_realtime_list_keeps_the_newest(make_store):
    s = make_store(cap=5)
    assert s.realtime("u1").dtype == EVENT and len(s.realtime("u1")) == 0
    first = ev([10, 11, 12])
    assert s.append({"u1": first, "u2": ev([7])}) == 4
    got = s.realtime("u1")
    assert got.tobytes() == first.tobytes()  # every field, bit for bit (NaN-free durations here)
    assert s.append({"u1": ev([13, 14, 15, 16], t0=100)}) == 4
    assert s.realtime("u1")["item"].tolist() == [12, 13, 14, 15, 16]  # capped at 5: the newest kept
    assert s.realtime("u2")["item"].tolist() == [7] and s.event_count() == 8
    unknown_duration = events(np.array([1]), np.array([0]), np.array([5]))
    s.append({"u3": unknown_duration})
    assert np.isnan(s.realtime("u3")["duration"][0]) and s.realtime("u3")["surface"][0] == -1


def test_a_retried_batch_is_applied_once_and_a_failing_batch_not_at_all(make_store):
    s = make_store(cap=100)
    assert s.append({"u1": ev([1, 2]), "u2": ev([3])}, batch_id="b-1") == 3
    assert s.append({"u1": ev([1, 2]), "u2": ev([3])}, batch_id="b-1") == 0  # the client retried: no duplicate
    assert s.realtime("u1")["item"].tolist() == [1, 2] and s.event_count() == 3
    with pytest.raises((ValueError, TypeError)):
        s.append({"u1": ev([4]), "u2": np.array(["not an event"])}, batch_id="b-2")
    assert s.realtime("u1")["item"].tolist() == [1, 2] and s.event_count() == 3  # u1's part was not applied
    assert s.append({"u1": ev([4])}, batch_id="b-2") == 1  # the failed id was not recorded either


def test_day_versions_are_invisible_until_published_and_switch_atomically(make_store):
    s = make_store()
    vecs, life = s.daily("u1")
    assert s.current_version() is None and vecs == {} and len(life) == 0
    v1 = np.arange(8, dtype=np.float32).reshape(2, 4)
    rank = np.array([[1.0, 2.0], [np.nan, np.nan]], np.float32)  # u2 has no ranking vector that day
    s.put_daily("2026-11-25", ["u1", "u2"], {"retrieval": v1, "ranking": rank}, lifelong={"u1": ev([5, 6])})
    assert s.current_version() is None and s.daily("u1")[0] == {}  # written, not published
    s.publish("2026-11-25")
    vecs, life = s.daily("u1")
    assert np.array_equal(vecs["retrieval"], v1[0]) and np.array_equal(vecs["ranking"], [1.0, 2.0])
    assert life["item"].tolist() == [5, 6] and list(s.daily("u2")[0]) == ["retrieval"]
    s.put_daily("2026-11-26", ["u1"], {"retrieval": v1[1:] * 10})
    assert np.array_equal(s.daily("u1")[0]["retrieval"], v1[0])  # still yesterday's until published
    s.publish("2026-11-26")
    assert np.array_equal(s.daily("u1")[0]["retrieval"], v1[1] * 10) and s.daily("u2")[0] == {}  # none that day
    assert len(s.daily("u1")[1]) == 0  # no lifelong blob in the new version
    assert np.array_equal(s.daily("u2", version="2026-11-25")[0]["retrieval"], v1[1])
    assert s.versions() == ["2026-11-25", "2026-11-26"]
    with pytest.raises(PinnerformerError, match="is the current version"):
        s.drop_version("2026-11-26")
    s.drop_version("2026-11-25")
    assert s.versions() == ["2026-11-26"] and s.daily("u1", version="2026-11-25")[0] == {}
    with pytest.raises(PinnerformerError, match="version '2026-12-01' was never written"):
        s.publish("2026-12-01")
    with pytest.raises(PinnerformerError, match="expected a short name without spaces"):
        s.put_daily("bad version", ["u1"], {"retrieval": v1[:1]})
    with pytest.raises(PinnerformerError, match="2 users for 1 'retrieval' vectors"):
        s.put_daily("2026-11-27", ["u1", "u2"], {"retrieval": v1[:1]})


def test_batch_ids_are_scoped_by_client_and_a_reused_id_with_other_events_is_a_conflict(make_store):
    from pinnerformer.serving.store import BatchConflict

    s = make_store(cap=100)
    assert s.append({"u1": ev([1, 2])}, batch_id="7", client="app-a") == 2
    assert s.append({"u1": ev([1, 2])}, batch_id="7", client="app-a") == 0  # a retry: applied once
    assert s.append({"u1": ev([1, 2])}, batch_id="7", client="app-b") == 2  # another client's counter: its own
    with pytest.raises(BatchConflict, match="batch_id '7' of client 'app-a' was applied with other events"):
        s.append({"u1": ev([3])}, batch_id="7", client="app-a")
    with pytest.raises(BatchConflict):  # same items, another time: other events
        s.append({"u1": ev([1, 2], t0=50)}, batch_id="7", client="app-a")
    assert s.realtime("u1")["item"].tolist() == [1, 2, 1, 2] and s.event_count() == 4


def test_the_event_log_keeps_every_acknowledged_batch_beyond_the_cap_by_day_in_order(make_store):
    s = make_store(cap=3)
    for b in range(10):
        s.append({"u1": ev([b])}, batch_id=f"b{b}", log={"2026-12-0" + str(1 + b % 2): f"entry {b}".encode()})
    assert s.append({"u1": ev([0])}, batch_id="b0", log={"2026-12-01": b"a retry"}) == 0  # applied once, logged once
    assert len(s.realtime("u1")) == 3  # the realtime list is capped; the log is not
    assert s.log_days() == ["2026-12-01", "2026-12-02"]
    first = s.read_log("2026-12-01")
    assert [e for _, e in first] == [f"entry {b}".encode() for b in range(0, 10, 2)]
    assert [e for _, e in s.read_log("2026-12-01", after=first[1][0])] == [b"entry 4", b"entry 6", b"entry 8"]
    assert s.read_log("2026-12-01", after=first[-1][0]) == [] and s.read_log("2026-12-03") == []
    with pytest.raises((ValueError, TypeError)):  # a failing batch writes no log entry either
        s.append({"u1": ev([4]), "u2": np.array(["not an event"])}, log={"2026-12-01": b"never"})
    assert len(s.read_log("2026-12-01")) == 5
    with pytest.raises(PinnerformerError, match="expected a day YYYY-MM-DD"):
        s.append({"u1": ev([4])}, log={"yesterday": b"x"})


def test_the_counters_hold_each_distinct_event_once_by_day_and_count_exactly_before_any_second(make_store):
    """Per user and item every distinct event, day by day in arrival order; the global counts before t from the
    day, hour, minute and second buckets equal a plain count at any t (midnights, events' seconds, between, a year
    on); a retried batch, a duplicate event and a failing batch count nothing; days before `since` are not read and
    prune drops them."""
    s = make_store(cap=2)
    day0 = 1_764_892_800  # 2025-12-05, a UTC midnight
    rng = np.random.default_rng(0)
    sent = []  # (user, item, action, ts) of every distinct event, in arrival order
    for b in range(12):
        batch = {}
        for u in ("u1", "u2", "u3")[: 1 + b % 3]:
            ts = day0 - 3600 + rng.integers(0, 3 * 86400, 6)  # the day before, the day of `since`, two more
            ts[0], ts[2] = ts[1], day0 - 1 - b  # two events at the same second; one on the day before `since`
            item, action = rng.integers(0, 9, 6), rng.integers(0, 3, 6)
            item[5], action[5], ts[5] = item[4], action[4], ts[4]  # an exact duplicate within the batch
            batch[u] = events(item, action, ts)
            sent += [(u, int(i), int(a), int(t)) for i, a, t in zip(item, action, ts)]
        assert s.append(batch, batch_id=f"b{b}") > 0
        if b == 4:
            assert s.append(batch, batch_id=f"b{b}") == 0  # a retry: counted once
            s.append({"u1": batch["u1"][:2]})  # the same events again, another batch: in the list, not counted
    with pytest.raises((ValueError, TypeError)):
        s.append({"u1": ev([4], t0=day0), "u2": np.array(["not an event"])})
    distinct = list(dict.fromkeys(sent))
    assert len(distinct) <= len(sent) - 12
    since = day0
    times = [day0, day0 + 1, day0 + 86399, day0 + 86400, day0 + 90061, day0 + 2 * 86400 + 5, day0 + 400 * 86400] + [
        t for _, _, _, t in distinct[:10] if t >= day0]
    got = s.counters(since, ["u1", "u2", "nobody"], [0, 3, 8], times, 3)

    def mine(keep):  # day by day, in arrival order within a day
        return sorted([(i, a, t) for u, i, a, t in distinct if keep(u, i) and since <= t < max(times)],
                      key=lambda e: e[2] // 86400)

    for u in ("u1", "u2"):
        r = got.users[u]
        assert [tuple(map(int, x)) for x in zip(r["item"], r["action"], r["ts"]) if x[2] < max(times)] == mine(
            lambda uu, _: uu == u)
    assert len(got.users["nobody"]) == 0 and got.users["nobody"].dtype == EVENT
    assert set(got.items["item"].tolist()) <= {0, 3, 8}
    for i in (0, 3, 8):
        r = got.items[got.items["item"] == i]
        assert sorted((int(a), int(t)) for a, t in zip(r["action"], r["ts"]) if t < max(times)) == sorted(
            (a, t) for _, a, t in mine(lambda _, ii: ii == i))
    many = s.counters(since, ["u1"], list(range(2500)), times, 3)  # a large request: read in chunks of keys
    assert set(many.items["item"].tolist()) <= set(range(9))
    for i in range(9):
        r = many.items[many.items["item"] == i]
        assert sorted((int(a), int(t)) for a, t in zip(r["action"], r["ts"]) if t < max(times)) == sorted(
            (a, t) for _, a, t in mine(lambda _, ii: ii == i))
    want = np.array([[sum(1 for _, _, a, ts in distinct if since <= ts < t and a == k) for k in range(3)]
                     for t in times])
    np.testing.assert_array_equal(got.before, want)
    assert got.before[-1].sum() > 0
    assert s.prune_counters(day0 + 86400) == ["2025-12-04", "2025-12-05"]
    later = s.counters(day0 + 86400, ["u1"], [3], times[-1:], 3)
    assert later.before[0].sum() == sum(1 for _, _, _, ts in distinct if day0 + 86400 <= ts < times[-1])
    assert s.counters(since, ["u1"], [], [day0 + 86400], 3).before.sum() == 0  # the pruned day is gone


def test_the_store_survives_being_reopened(make_store):
    s = make_store(cap=50)
    s.append({"u1": ev([1, 2, 3])}, batch_id="x")
    s.put_daily("d1", ["u1"], {"retrieval": np.ones((1, 4), np.float32)})
    s.publish("d1")
    s.close()
    again = make_store(cap=50)
    assert again.realtime("u1")["item"].tolist() == [1, 2, 3] and again.current_version() == "d1"
    assert again.append({"u1": ev([1, 2, 3])}, batch_id="x") == 0


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pinnerformer.serving.store import events
    from pinnerformer.serving.stores import open_store
    from pinnerformer.serving.store_redis import RedisStore
    url, ns = sys.argv[1], sys.argv[2]
    s = RedisStore(url, realtime_cap=100000, namespace=ns) if url.startswith("redis") else open_store(url, 100000)
    for b in range(100000):
        # batch b: 3 users x 2 events, items encode the batch
        s.append({f"u{k}": events(np.array([b * 10 + k, b * 10 + k]), np.array([1, 2]), np.array([b, b]))
                  for k in range(3)}, batch_id=f"b{b}", log={"2026-12-01": str(b).encode()})
        print(b, flush=True)  # acknowledged
""")


def test_a_writer_killed_mid_ingestion_loses_no_acknowledged_event_and_half_applies_no_batch(make_store, tmp_path):
    s = make_store(cap=100000)
    url = s.url
    ns = getattr(s, "ns", "")
    s.close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url, ns], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    acked = []
    deadline = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    proc.kill()  # kill -9, in the middle of the stream of appends
    proc.wait()
    assert len(acked) >= 150, "the writer did not get going"
    # acknowledgements printed before the kill but not read yet are acknowledged too (a loaded machine lets the
    # writer run ahead of this reader)
    acked += [int(line) for line in proc.stdout.read().split()]
    s = make_store(cap=100000)
    per_user = [s.realtime(f"u{k}") for k in range(3)]
    batches = [np.unique(r["ts"], return_counts=True) for r in per_user]
    applied = set(batches[0][0].tolist())
    assert set(acked) <= applied  # every acknowledged batch is there
    for (ts, counts), r in zip(batches, per_user):
        assert set(ts.tolist()) == applied  # all of a batch's users, or none
        assert (counts == 2).all()  # each batch once, whole
    assert s.event_count() == 6 * len(applied) and len(applied) - len(acked) <= 1  # at most the one in flight
    logged = [int(e) for _, e in s.read_log("2026-12-01")]
    assert sorted(logged) == sorted(applied)  # the event log holds exactly the applied batches, each once
    counted = s.counters(0, ["u0", "u1", "u2"], [], [max(applied) + 1], 3)  # the counters too, whole batches
    for u, r in zip(("u0", "u1", "u2"), per_user):
        assert counted.users[u].tobytes() == r.tobytes()
    assert counted.before[0].tolist() == [0, 3 * len(applied), 3 * len(applied)]


def test_redis_killed_keeps_acknowledged_events_and_the_store_recovers_without_reopening(redis_server, tmp_path):
    from pinnerformer.serving.redis_server import RedisServer
    from pinnerformer.serving.store_redis import RedisStore

    server = RedisServer(tmp_path / "r").start()
    s = RedisStore(server.url, realtime_cap=1000)
    for b in range(50):
        s.append({"u": ev([b])}, batch_id=str(b))
    server.kill()  # a crash of Redis itself
    with pytest.raises(StoreUnavailable, match=f"Redis at {server.url} is unreachable"):
        s.append({"u": ev([99])})
    with pytest.raises(StoreUnavailable):
        s.ping()
    server.start()  # same port, same directory: the append-only file is replayed
    s.ping()  # the same store object, reconnected
    assert s.realtime("u")["item"].tolist() == list(range(50)) and s.event_count() == 50
    server.stop()


def test_open_store_picks_the_backend_from_the_url(tmp_path, redis_server):
    assert isinstance(open_store(str(tmp_path / "a")), LmdbStore)
    assert isinstance(open_store(f"lmdb://{tmp_path / 'b'}"), LmdbStore)
    from pinnerformer.serving.store_redis import RedisStore

    assert isinstance(open_store(redis_server.url), RedisStore)
