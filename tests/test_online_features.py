"""Online point-in-time features (features/online.py): the static log (events before a day version's end E) and the
delta (the events from E on, as the store keeps them: each query user's, each candidate's, global counts per
action) give exactly what `feature_table` gives on their union, for every family, on random logs with ties, users
and items seen only after E or never, and request times from E on, many of whose windows straddle E; the delta
changes the values (a combine that ignored it would fail); a user's own events on a candidate are counted once; a
family that reads the events other than through its `_times` is refused with a message saying so."""

import numpy as np
import pytest

from pinnerformer.errors import PinnerformerError
from pinnerformer.features.online import OTHERS, Delta, online_table
from pinnerformer.features.point_in_time import FAMILIES, EventLog, FeatureConfig, Queries, feature_table

DAY = 86400
T0 = 1_600_000_000 - 1_600_000_000 % DAY  # a UTC midnight
RECORD = np.dtype([("item", "<i4"), ("action", "<i2"), ("ts", "<i8")])


def union_log(seed: int, values: bool, E: int, n: int = 2500, U: int = 16, I: int = 24, A: int = 3):
    """A random log over 40 days; user U-2 acts only from E on, user U-1 never; the events from E on carry no number
    (the service's events carry none)."""
    rng = np.random.default_rng(seed)
    user, item, action = rng.integers(U - 2, size=n), rng.integers(I, size=n), rng.integers(A, size=n)
    ts = T0 + rng.integers(40 * DAY, size=n)
    ts[:40] = ts[40]  # ties across users and items
    ts[40:60] = E  # exactly at the split
    late = rng.random(n) < 0.05
    user[late], ts[late] = U - 2, np.maximum(ts[late], E)
    dup = rng.integers(n, size=30)  # the same (item, action, time) by other users
    user = np.concatenate([user, (user[dup] + 1) % (U - 2)])
    item, action, ts = (np.concatenate([x, x[dup]]) for x in (item, action, ts))
    order = np.lexsort((ts, user))
    value = None
    if values:
        value = np.where(rng.random(len(ts)) < 0.8, rng.integers(1, 6, size=len(ts)).astype(float), np.nan)
        value[ts >= E] = np.nan
        value = value[order]
    interests = [np.array(sorted(rng.choice(5, size=rng.integers(0, 3), replace=False)), np.int64) for _ in range(I)]
    vec = rng.normal(size=(I, 8)).astype(np.float32)
    return EventLog(user[order], item[order], action[order], ts[order], value, U, I, ["view", "save", "hide"],
                    [("save", np.array([1])), ("any", np.array([0, 1])), ("hide", np.array([2]))], interests,
                    vec / np.linalg.norm(vec, axis=1, keepdims=True), neighbours_until=min(E, T0 + 15 * DAY))


def queries(log: EventLog, E: int, seed: int, n_requests: int = 60, per: int = 6) -> Queries:
    """Requests (one user, one time, `per` candidates) at E, at delta events' times, at midnights and in between."""
    rng = np.random.default_rng(seed + 1)
    later = log.ts[log.ts >= E] if (log.ts >= E).any() else np.array([E])
    t = np.concatenate([[E, E + DAY, E + 3 * DAY], rng.choice(later, 20), E + rng.integers(12 * DAY, size=n_requests)
                        ])[:n_requests]
    user = rng.integers(log.n_users, size=n_requests)
    items = np.stack([rng.choice(log.n_items, per, replace=False) for _ in range(n_requests)])
    return Queries(np.repeat(user, per), items.reshape(-1), np.repeat(t, per), np.repeat(np.arange(n_requests), per))


def split(log: EventLog, E: int, q: Queries) -> tuple[EventLog, Delta]:
    """The static log and the delta the store would give for `q`."""
    after = log.ts >= E
    cut = ~after
    static = EventLog(log.user[cut], log.item[cut], log.action[cut], log.ts[cut],
                      None if log.value is None else log.value[cut], log.n_users, log.n_items, log.action_names,
                      log.heads, log.item_interests, log.item_vectors, log.neighbours_until)

    def records(mask):
        r = np.zeros(int(mask.sum()), RECORD)
        r["item"], r["action"], r["ts"] = log.item[mask], log.action[mask], log.ts[mask]
        return r  # in the log's order: a user's events in arrival order, as the store appends them

    users = {int(u): records(after & (log.user == u)) for u in np.unique(q.user)}
    items = records(after & np.isin(log.item, q.item))
    times = np.unique(q.t)
    counts = np.stack([np.bincount(log.action[after & (log.ts < t)], minlength=len(log.action_names))
                       for t in times])
    return static, Delta.build(E, users, items, times, counts)


@pytest.mark.parametrize("seed,values,split_day", [(0, True, 20), (1, False, 33), (2, True, 39), (3, True, 2)])
def test_online_features_equal_the_union_logs_exactly(seed, values, split_day):
    E = T0 + split_day * DAY
    log = union_log(seed, values, E)
    q = queries(log, E, seed)
    cfg = FeatureConfig(seq_n=7, windows_days=[1, 7, 30])
    assert cfg.families == list(FAMILIES)  # every family has its online form
    static, delta = split(log, E, q)
    want = feature_table(log, q, cfg)
    got = online_table(static, delta, q, cfg)
    assert got.names == want.names and ("value.item_mean" in got.names) == values
    np.testing.assert_array_equal(got.values, want.values)
    # the delta matters: without it the values differ, window by window and family by family
    stale = feature_table(static, q, cfg).values
    moved = {n for j, n in enumerate(got.names) if (stale[:, j] != got.values[:, j]).any()}
    for name in ("item.events.1d", "item.save.7d", "item.events.30d", "item.rate.save", "item.recency_h",
                 "user.events.1d", "user.events.all", "user.active_days", "ui.view", "ui.recency_h",
                 "uint.events", "uint.rate.save", "seq.same_item", "seq.cos_last", "req.popularity_rank", "nb.weight", "nb.save"):
        assert name in moved, name


def test_without_events_since_the_split_the_online_features_are_the_static_logs():
    E = T0 + 41 * DAY  # after the log's last event
    log = union_log(4, True, T0 + 30 * DAY)
    log.value[:] = np.where(np.isnan(log.value), 2.0, log.value)
    q = queries(log, E, 4)
    times = np.unique(q.t)
    cfg = FeatureConfig(seq_n=7)
    got = online_table(log, Delta.build(E, {}, np.zeros(0, RECORD), times, np.zeros((len(times), 3), np.int64)), q,
                       cfg)
    np.testing.assert_array_equal(got.values, feature_table(log, q, cfg).values)


def test_a_users_own_events_on_a_candidate_are_counted_once_and_others_at_the_same_second_kept():
    E = T0 + 10 * DAY
    rec = np.zeros(3, RECORD)
    rec["item"], rec["action"], rec["ts"] = 5, 1, [E + 10, E + 10, E + 20]  # twice at E + 10 (two users)
    mine = rec[[0, 2]]
    d = Delta.build(E, {3: mine}, rec, [E + 30], [[0, 3, 0]])
    assert sorted(zip(d.user.tolist(), d.ts.tolist())) == [(OTHERS, E + 10), (3, E + 10), (3, E + 20)]
    with pytest.raises(PinnerformerError, match="before the served day version's end"):
        Delta.build(E + DAY, {3: mine}, rec[:0], [E + DAY], [[0, 0, 0]])


def test_the_static_log_must_end_at_a_midnight_before_the_delta():
    E = T0 + 20 * DAY
    log = union_log(0, False, E, n=300)
    q = queries(log, E, 0, n_requests=5)
    static, delta = split(log, E, q)
    cfg = FeatureConfig()
    with pytest.raises(PinnerformerError, match="not a UTC midnight"):
        online_table(static, Delta(E + 1, *[getattr(delta, f) for f in ("user", "item", "action", "ts", "times",
                                                                          "counts")]), q, cfg)
    with pytest.raises(PinnerformerError, match="at or after the split"):
        online_table(log, delta, q, cfg)
    from dataclasses import replace
    with pytest.raises(PinnerformerError, match="before the end of the item similarity snapshot"):
        online_table(replace(static, neighbours_until=E + DAY, cache={}), delta, q, cfg)


def test_a_family_reading_the_events_other_than_through_its_times_is_refused_clearly(monkeypatch):
    from pinnerformer.features import request_rank

    E = T0 + 20 * DAY
    log = union_log(0, False, E, n=300)
    q = queries(log, E, 0, n_requests=5)
    static, delta = split(log, E, q)
    cfg = FeatureConfig(families=["request_rank"])
    monkeypatch.setattr(request_rank, "columns", lambda log, q, cfg: {"x": np.asarray(log.item)[q.item]})
    with pytest.raises(PinnerformerError, match="read the union log's events whole instead of through its"):
        online_table(static, delta, q, cfg)
    monkeypatch.setattr(request_rank, "columns", lambda log, q, cfg: {"x": log.cache["request_rank.v2"][q.item]})
    with pytest.raises(PinnerformerError, match=r"keeps its times under log.cache\['request_rank.v2'\]"):
        online_table(static, delta, q, cfg)
