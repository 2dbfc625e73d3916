"""Point-in-time features (features/point_in_time.py and one module per family): every family's vectorised form
equals its plain per-row reference exactly on a random log with ties, empty users and items without interests;
nothing at or after a row's time changes its features (events changed, added at exactly t, removed), while one event
just before t does; windows are UTC-day aligned."""

import numpy as np
import pytest

from pinnerformer.features.point_in_time import (
    FAMILIES, EventLog, FeatureConfig, GroupedTimes, Queries, feature_table, reference_table,
)

DAY = 86400
T0 = 1_600_000_000


def random_log(seed=0, E=3000, U=20, I=30, A=3, values=True):
    rng = np.random.default_rng(seed)
    user, item, action = rng.integers(U - 1, size=E), rng.integers(I, size=E), rng.integers(A, size=E)  # user U-1: none
    ts = T0 + rng.integers(40 * DAY, size=E)
    ts[:60] = ts[60]  # ties across users
    order = np.lexsort((ts, user))
    value = np.where(rng.random(E) < 0.8, rng.integers(1, 6, size=E).astype(float), np.nan) if values else None
    interests = [np.array(sorted(rng.choice(5, size=rng.integers(0, 3), replace=False)), np.int64) for _ in range(I)]
    vec = rng.normal(size=(I, 8)).astype(np.float32)
    log = EventLog(user[order], item[order], action[order], ts[order], None if value is None else value[order], U, I,
                   ["view", "save", "hide"], [("save", np.array([1])), ("any", np.array([0, 1])),
                                              ("hide", np.array([2]))], interests,
                   vec / np.linalg.norm(vec, axis=1, keepdims=True), neighbours_until=T0 + 15 * DAY)
    Q = 240
    t = np.concatenate([log.ts[rng.integers(E, size=Q // 2)],  # exactly at event times: ties with t
                        T0 + rng.integers(-2 * DAY, 45 * DAY, size=Q - Q // 2)])  # before the first event too
    q = Queries(rng.integers(U, size=Q), rng.integers(I, size=Q), t, np.sort(rng.integers(50, size=Q)))
    return log, q


@pytest.mark.parametrize("values", [True, False])
def test_every_family_equals_its_plain_reference_exactly(values):
    log, q = random_log(values=values)
    cfg = FeatureConfig(seq_n=7, windows_days=[1, 3, 30])
    fast, ref = feature_table(log, q, cfg), reference_table(log, q, cfg)
    assert fast.names == ref.names and np.isfinite(fast.values).all()
    assert ("value.item_mean" in fast.names) == values
    prefixes = {"item", "user", "ui", "uint", "seq", "req", "nb"} | ({"value"} if values else set())
    assert {n.split(".")[0] for n in fast.names} == prefixes and len(cfg.families) == len(FAMILIES)
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-6, atol=1e-6)
    # the values vary (a table of constants would pass the comparison too)
    assert (fast.values.std(0) > 0).sum() >= len(fast.names) - 3


def test_nothing_at_or_after_the_rows_time_changes_its_features_and_one_event_before_does():
    log, q = random_log(seed=1)
    cfg = FeatureConfig(seq_n=7)
    rng = np.random.default_rng(2)
    for i in rng.choice(len(q), 12, replace=False):
        t = int(q.t[i])
        row = q.row(i)
        base = feature_table(log, row, cfg).values
        later = log.ts >= t
        # change every later event, add some at exactly t on the row's own user and item, drop some later ones
        n_add = 5
        keep = ~(later & (rng.random(len(log.ts)) < 0.3))
        item = np.where(later, rng.integers(log.n_items, size=len(log.ts)), log.item)
        action = np.where(later, rng.integers(3, size=len(log.ts)), log.action)
        value = np.where(later, 5.0, log.value)
        new = EventLog(np.concatenate([log.user[keep], np.full(n_add, q.user[i])]),
                       np.concatenate([item[keep], np.full(n_add, q.item[i])]),
                       np.concatenate([action[keep], np.arange(n_add) % 3]),
                       np.concatenate([log.ts[keep], np.full(n_add, t)]),
                       np.concatenate([value[keep], np.full(n_add, 1.0)]), log.n_users, log.n_items,
                       log.action_names, log.heads, log.item_interests, log.item_vectors, log.neighbours_until)
        np.testing.assert_array_equal(feature_table(new, row, cfg).values, base)
        # one event on this user and item one second before t: the features see it
        earlier = EventLog(np.append(log.user, q.user[i]), np.append(log.item, q.item[i]), np.append(log.action, 1),
                           np.append(log.ts, t - 1), np.append(log.value, 1.0), log.n_users, log.n_items,
                           log.action_names, log.heads, log.item_interests, log.item_vectors, log.neighbours_until)
        assert not np.array_equal(feature_table(earlier, row, cfg).values, base)


def test_windows_are_utc_day_aligned_and_counts_exclude_t_itself():
    g = GroupedTimes(np.zeros(5, np.int64), np.array([T0 - DAY, T0 - 10, T0, T0 + 5, T0 + 10]))
    day_start = (T0 // DAY) * DAY
    t = np.array([T0 + 5])
    # [lo, t): T0 - 10 and T0 are before t (T0 + 5 is at t: not counted)
    assert g.count(np.zeros(1, np.int64), np.array([day_start]), t)[0] == sum(
        day_start <= x < T0 + 5 for x in [T0 - DAY, T0 - 10, T0, T0 + 5, T0 + 10])
    assert g.last_before(np.zeros(1, np.int64), t)[0] == T0 and np.isnan(g.last_before(np.ones(1, np.int64), t)[0])
    assert np.isnan(g.first_before(np.zeros(1, np.int64), np.array([T0 - DAY]))[0])  # the first event is at t
    assert g.first_before(np.zeros(1, np.int64), np.array([T0 - DAY + 1]))[0] == T0 - DAY


@pytest.mark.parametrize("share", [0.0, 0.1, 0.9])
def test_grouped_times_answers_equal_a_scan_of_the_events_whether_few_or_most_keys_have_events(share):
    """The sparse path (few asked keys have events: only those rows are searched), the dense one, and the groups kept
    for a key array asked about again all give what a scan of the events gives."""
    rng = np.random.default_rng(int(share * 10))
    n, rows = 400, 300
    key, ts = rng.integers(0, 12, n), T0 + rng.integers(0, 5 * DAY, n)
    ts[:40] = ts[40]  # ties
    g = GroupedTimes(key, ts)
    asked = np.where(rng.random(rows) < share, rng.integers(0, 12, rows), rng.integers(100, 200, rows))
    values = rng.normal(size=n)
    for t in (T0 + rng.integers(-DAY, 6 * DAY, rows), np.full(rows, T0 + 3 * DAY)):  # the same key array twice
        lo = (t // DAY - 1) * DAY
        mine = (key[None, :] == asked[:, None]) & (ts[None, :] < t[:, None])
        assert np.array_equal(g.count(asked, None, t), mine.sum(1))
        assert all(np.array_equal(a, b) for a, b in zip(
            g.counts(asked, [lo, None], t), [(mine & (ts[None, :] >= lo[:, None])).sum(1), mine.sum(1)]))
        last = np.where(mine, ts[None, :], -1).max(1)
        assert np.array_equal(np.nan_to_num(g.last_before(asked, t), nan=-1), last)
        assert np.allclose(g.sum_before(asked, t, values), (mine * values[None, :]).sum(1))
        idx, valid = g.window(asked, t, 3)
        assert np.array_equal(valid.sum(1), np.minimum(mine.sum(1), 3))
        newest = -np.sort(-np.where(mine, ts[None, :], -1), axis=1)[:, :3]  # the 3 latest times before t, newest first
        assert np.array_equal(np.where(valid, ts[idx], -1), newest)
        assert np.where(valid, ts[idx] < t[:, None], True).all() and (key[idx][valid] == np.repeat(
            asked, 3).reshape(-1, 3)[valid]).all()
