"""item_neighbours (features/item_neighbours.py): the sparse similarity snapshot equals a dense plain reference, with
and without values; it reads only the events before its end; planted tastes come out (a user who loved group A's
items and hated group B's scores A's candidates up and B's down); rows before the snapshot's end see nothing."""

import sys
from pathlib import Path

import numpy as np
import pytest

from pinnerformer.features.item_neighbours import build_neighbours, reference_neighbours
from pinnerformer.features.point_in_time import EventLog, FeatureConfig, Queries, feature_table

sys.path.insert(0, str(Path(__file__).parent))
from test_point_in_time import DAY, T0, random_log  # noqa: E402


def dense(nb, n_items: int) -> np.ndarray:
    out = np.zeros((n_items, n_items))
    out[nb.keys // n_items, nb.keys % n_items] = nb.sims
    return out


@pytest.mark.parametrize("values,kept", [(True, 3), (False, 3), (True, 100), (False, 100)])
def test_the_sparse_snapshot_equals_the_dense_reference(values, kept):
    log, _ = random_log(seed=4, values=values)
    until = T0 + 20 * DAY
    got = dense(build_neighbours(log, until, kept, 5.0), log.n_items)
    want = reference_neighbours(log, until, kept, 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    per_item = (got > 0).sum(1)
    assert per_item.max() == (kept if kept < log.n_items - 1 else per_item.max()) and per_item.min() > 0
    if kept >= log.n_items:  # uncut: co-engaged pairs all kept, while centred values drop the dissimilar ones
        assert (per_item.max() < log.n_items - 1) == values


def test_the_snapshot_reads_only_the_events_before_its_end():
    log, _ = random_log(seed=5)
    until = T0 + 12 * DAY
    base = dense(build_neighbours(log, until, 10, 5.0), log.n_items)
    late = log.ts >= until
    rng = np.random.default_rng(0)
    changed = EventLog(log.user, np.where(late, rng.integers(log.n_items, size=len(late)), log.item), log.action,
                       log.ts, np.where(late, 1.0, log.value), log.n_users, log.n_items, log.action_names,
                       log.heads, log.item_interests)
    np.testing.assert_array_equal(dense(build_neighbours(changed, until, 10, 5.0), log.n_items), base)
    assert not np.array_equal(dense(build_neighbours(changed, until + DAY, 10, 5.0), log.n_items), base)


def planted(values: bool):
    """40 users: the even ones love (rate 5) every item 0-9 (group A) and dislike (rate 1) three of 10-19 (group B),
    the odd ones the reverse: co-engaged within a group more than across, and rated alike within it. All of it before
    day 10; then user 0 (even) and user 1 (odd) each act on two items of each group."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        mine, other = (np.arange(10), np.arange(10, 20)) if u % 2 == 0 else (np.arange(10, 20), np.arange(10))
        for i in np.concatenate([mine, rng.choice(other, 3, replace=False)]):
            likes = (i < 10) == (u % 2 == 0)
            rows.append((u, int(i), 1 if likes else 2, T0 + int(rng.integers(9 * DAY)), 5.0 if likes else 1.0))
    for u in (0, 1):
        for i in (0, 1, 10, 11):
            likes = (i < 10) == (u % 2 == 0)
            rows.append((u, i, 1 if likes else 2, T0 + 11 * DAY + i, 5.0 if likes else 1.0))
    user, item, action, ts, value = (np.array(c) for c in zip(*rows))
    order = np.lexsort((ts, user))
    log = EventLog(user[order], item[order], action[order], ts[order], value[order] if values else None, 40, 20,
                   ["view", "love", "dislike"], [("save", np.array([1])), ("hide", np.array([2]))],
                   [np.zeros(0, np.int64)] * 20, neighbours_until=T0 + 10 * DAY)
    return log


@pytest.mark.parametrize("values", [True, False])
def test_planted_tastes_come_out_and_rows_before_the_snapshot_see_nothing(values):
    log = planted(values)
    cfg = FeatureConfig(families=["item_neighbours"])
    cand = np.array([5, 6, 15, 16])  # two of group A, two of group B, none acted on by users 0 and 1 after day 10
    t = T0 + 12 * DAY
    q = Queries(np.repeat([0, 1], 4), np.tile(cand, 2), np.full(8, t), np.repeat([0, 1], 4))
    f = feature_table(log, q, cfg)
    col = {n: f.values[:, j] for j, n in enumerate(f.names)}
    assert ("nb.value" in col) == values
    a, b = np.array([1, 1, 0, 0, 0, 0, 1, 1], bool), np.array([0, 0, 1, 1, 1, 1, 0, 0], bool)  # liked / not
    assert col["nb.save.lift"][a].min() > 0 > col["nb.save.lift"][b].max()
    assert col["nb.hide.lift"][b].min() > 0 > col["nb.hide.lift"][a].max()
    if values:
        assert col["nb.value"][a].min() > 0 > col["nb.value"][b].max()
    # the same requests before the snapshot's end (user 0 already has history then): the no-history values
    early = Queries(q.user, q.item, np.full(8, T0 + 9 * DAY + 1), q.request)
    e = feature_table(log, early, cfg).values
    assert (e[:, f.names.index("nb.weight")] == 0).all() and (e[:, f.names.index("nb.save.lift")] == 0).all()
