"""Exact counts on the real public datasets (docs/data.md), and a round trip of known rows."""

import numpy as np
import polars as pl
import pytest

from pinnerformer.data import Dataset
from pinnerformer.quickstart import builtin_data_dir


def prepare(cli, fmt, src, out):
    r = cli("data", "prepare", "--format", fmt, "--input", src, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    return Dataset.open(out)


def assert_sorted(ds):
    ev = ds.events()
    assert ev.equals(ev.sort(["user", "ts"], maintain_order=True))
    tl = ds.timelines
    assert np.array_equal(np.asarray(tl.item), ev["item"].to_numpy())
    assert tl.n_users == ds.manifest.n_users and tl.n_events == ds.manifest.n_events


def test_movielens_1m_subset(cli, shared_data, tmp_path):
    ds = prepare(cli, "movielens", shared_data / "movielens-1m-subset", tmp_path / "d")
    m = ds.manifest
    assert (m.n_events, m.n_users, m.n_items) == (487_650, 2_999, 3_615)
    assert m.clock == "seconds" and m.duplicates_removed == 0
    assert m.skipped == {"catalogue_items_without_events": 3_883 - 3_615}
    assert [a.name for a in m.actions if a.positive] == ["love", "like"]
    assert_sorted(ds)
    # first line of ratings.dat: 1::1193::5::978300760 -> user 1, movie 1193, love, that second
    u = ds.users.filter(pl.col("user_id") == 1)["user"].item()
    it = ds.items.filter(pl.col("item_id") == 1193)
    tl = ds.timelines.user(u)
    hit = (tl.item == it["item"].item()) & (tl.ts == 978300760)
    assert hit.sum() == 1 and m.actions[int(tl.action[hit][0])].name == "love"
    assert it["text"].item().startswith("One Flew Over the Cuckoo's Nest (1975). Genres: Drama")
    assert it["interests"].item().to_list() == ["Drama"]


def test_movielens_100k(cli, shared_data, tmp_path):
    ds = prepare(cli, "movielens", shared_data / "movielens-100k", tmp_path / "d")
    m = ds.manifest
    assert (m.n_events, m.n_users, m.n_items) == (100_000, 943, 1_682)
    toy = ds.items.filter(pl.col("item_id") == 1)
    assert toy["interests"].item().to_list() == ["Animation", "Children's", "Comedy"]
    assert_sorted(ds)


def test_movielens_latest_small_shared_equals_builtin(cli, shared_data, tmp_path):
    a = prepare(cli, "movielens-latest", shared_data / "movielens-latest-small", tmp_path / "a")
    b = prepare(cli, "movielens-latest", builtin_data_dir(), tmp_path / "b")
    assert a.manifest.fingerprint == b.manifest.fingerprint
    assert [s.sha256 for s in a.manifest.sources] == [s.sha256 for s in b.manifest.sources]


def test_movielens_latest_small_builtin(cli, tmp_path):
    ds = prepare(cli, "movielens-latest", builtin_data_dir(), tmp_path / "d")
    m = ds.manifest
    ratings = sum(n for a, n in m.events_per_action.items() if a != "tag")
    assert (ratings, m.events_per_action["tag"], m.n_users) == (100_836, 3_683, 610)
    # 260 tag rows share (user, movie, second) with another tag: distinct tags, not duplicates
    assert m.duplicates_removed == 0
    assert m.n_items == 9_742 and m.skipped == {}
    assert (ds.items["interests"].list.len() == 0).sum() == 34  # "(no genres listed)" -> empty list
    assert_sorted(ds)


def test_amazon_beauty(cli, shared_data, tmp_path):
    ds = prepare(cli, "sequences", shared_data / "amazon-beauty", tmp_path / "d")
    m = ds.manifest
    assert (m.n_events, m.n_users, m.n_items) == (198_502, 22_363, 12_101)
    assert m.clock == "order" and any("no real clock" in n for n in m.notes)
    # line 2 of Beauty.txt: "2 6 7 8 9 10 4 11", in order, positions 0..6
    u = ds.users.filter(pl.col("user_id") == 2)["user"].item()
    tl = ds.timelines.user(u)
    ids = ds.items["item_id"].to_numpy()[tl.item]
    assert ids.tolist() == [6, 7, 8, 9, 10, 4, 11] and tl.ts.tolist() == list(range(7))
    # attributes become interests
    assert ds.items.filter(pl.col("item_id") == 4)["interests"].item().to_list() == ["1", "2", "3"]
    with pytest.raises(Exception, match="no real clock"):
        ds.timelines.as_of(3)


def test_otto_sample(cli, shared_data, tmp_path):
    ds = prepare(cli, "otto", shared_data / "otto-sample", tmp_path / "d")
    m = ds.manifest
    assert m.n_users == 20 and m.action_names() == ["clicks", "carts", "orders"]
    # session 0 starts with aid 1517085 at 1659304800025 ms
    tl = ds.timelines.user(0)
    assert ds.items["item_id"][int(tl.item[0])] == 1517085 and tl.ts[0] == 1659304800
    assert_sorted(ds)
