"""Timelines: offsets, zero-copy views, as-of cut-offs against a brute-force reference, memory-mapping."""

import numpy as np
import pytest

from pinnerformer.data.timelines import Timelines
from pinnerformer.errors import PinnerformerError


def random_timelines(seed=0, n_users=200, clock="seconds"):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, n_users)
    lengths[:3] = [0, 1, 29]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    ts = np.concatenate([np.sort(rng.integers(0, 1000, k)) for k in lengths]).astype(np.int64)
    return Timelines(offsets=offsets, item=rng.integers(0, 50, n).astype(np.int32),
                     action=rng.integers(0, 4, n).astype(np.int16), ts=ts,
                     surface=rng.integers(-1, 3, n).astype(np.int16),
                     duration=rng.random(n).astype(np.float32), clock=clock)


def test_user_slices_are_views():
    tl = random_timelines()
    u = tl.user(2)
    assert len(u) == 29 and np.shares_memory(u.item, tl.item)
    assert tl.user(0).item.size == 0
    assert np.array_equal(tl.user_of_event(), np.repeat(np.arange(tl.n_users), tl.lengths))


@pytest.mark.parametrize("t", [0, 1, 437, 999, 1000, 5000])
def test_as_of_scalar_matches_brute_force(t):
    tl = random_timelines()
    view = tl.as_of(t)
    for u in range(tl.n_users):
        full = tl.user(u)
        got = view.user(u)
        assert np.array_equal(got.ts, full.ts[full.ts < t])
        assert np.array_equal(got.item, full.item[full.ts < t])
        if len(got):
            assert np.shares_memory(got.item, tl.item)


def test_as_of_per_user_cutoffs_and_chaining():
    tl = random_timelines(seed=1)
    rng = np.random.default_rng(2)
    t = rng.integers(0, 1000, tl.n_users)
    view = tl.as_of(t)
    for u in range(tl.n_users):
        full = tl.user(u)
        assert np.array_equal(view.user(u).ts, full.ts[full.ts < t[u]])
    # restricting twice keeps the tighter bound; last(n) keeps the n newest of the view
    v2 = view.before(500).last(3)
    for u in range(tl.n_users):
        full = tl.user(u)
        want = full.ts[full.ts < min(t[u], 500)][-3:]
        assert np.array_equal(v2.user(u).ts, want)


def test_drop_last_and_active_users():
    tl = random_timelines()
    v = tl.drop_last(2)
    assert np.array_equal(v.lengths, np.maximum(tl.lengths - 2, 0))
    assert set(v.active_users(1)) == set(np.flatnonzero(tl.lengths >= 3))


def test_order_clock_refuses_time_cutoff():
    tl = random_timelines(clock="order")
    with pytest.raises(PinnerformerError, match="no real clock"):
        tl.as_of(5)
    assert tl.drop_last(1).lengths.sum() == np.maximum(tl.lengths - 1, 0).sum()


def test_save_load_mmap_round_trip(tmp_path):
    tl = random_timelines()
    tl.save(tmp_path / "tl")
    back = Timelines.load(tmp_path / "tl", mmap=True)
    assert isinstance(back.item, np.memmap) and back.clock == "seconds"
    for c in ["offsets", "item", "action", "ts", "surface", "duration"]:
        assert np.array_equal(getattr(back, c), getattr(tl, c))
    assert back.content_hash().hexdigest() == tl.content_hash().hexdigest()
    changed = Timelines(**{c: getattr(tl, c) for c in ["offsets", "action", "ts", "surface", "duration"]},
                        item=np.where(np.arange(tl.n_events) == 7, 49 - tl.item, tl.item).astype(np.int32))
    assert changed.content_hash().hexdigest() != tl.content_hash().hexdigest()


def test_mismatched_arrays_rejected():
    tl = random_timelines()
    with pytest.raises(ValueError, match="do not match"):
        Timelines(offsets=tl.offsets, item=tl.item[:-1], action=tl.action, ts=tl.ts, surface=tl.surface,
                  duration=tl.duration)


def test_positive_item_counts_over_a_view():
    from types import SimpleNamespace

    from pinnerformer.evaluation.protocols import positive_item_counts

    tl = random_timelines()
    ds = SimpleNamespace(manifest=SimpleNamespace(positive_codes=[1, 3], n_items=50))
    view = tl.as_of(500).drop_last(1)
    want = np.zeros(50)
    for u in range(tl.n_users):
        x = view.user(u)
        np.add.at(want, x.item[np.isin(x.action, [1, 3])], 1)
    assert np.array_equal(positive_item_counts(ds, view), want)
