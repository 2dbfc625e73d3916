"""The readers the ranking data needs: `taobao` (UserBehavior, with its real cut-off last line) and `mind`
(behaviours with clicked / not-clicked impressions, order-only history), checked against counts made
independently from the raw files, and their bad-input messages."""

import csv
import datetime as dt
import json

import polars as pl

from pinnerformer.data import Dataset


def test_taobao_sample_every_line_accounted_for(shared_data, tmp_path, cli):
    src = shared_data / "taobao-userbehavior-head" / "UserBehavior.csv"
    r = cli("data", "prepare", "-f", "taobao", "-i", src, "-o", tmp_path / "tb")
    assert r.exit_code == 2 and "the file does not end with a newline" in r.stderr and "1968385" in r.stderr
    r = cli("data", "prepare", "-f", "taobao", "-i", src, "-o", tmp_path / "tb", "--skip-invalid", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    lines = src.read_text().split("\n")
    complete = [row for row in csv.reader(lines[:-1]) if row]
    lo = int(dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc).timestamp())
    sane = [row for row in complete if lo <= int(row[4]) <= dt.datetime.now(dt.timezone.utc).timestamp() + 86400]
    assert s["skipped"]["truncated_last_line"] == 1
    assert s["skipped"].get("time_out_of_range", 0) == len(complete) - len(sane)
    assert s["events"] + s["duplicates_removed"] == len(sane)
    for action in ("pv", "cart", "fav", "buy"):
        assert s["events_per_action"][action] <= sum(row[3] == action for row in sane)
    assert s["positive_actions"] == ["cart", "fav", "buy"] and s["users"] == len({row[0] for row in sane})
    ds = Dataset.open(tmp_path / "tb")
    cat = {row[1]: row[2] for row in sane}
    some = ds.items.head(50)
    assert all(list(interests) == [cat[str(item)]]
               for item, interests in zip(some["item_id"], some["interests"].to_list()))


def test_mind_sample_requests_impressions_and_history(shared_data, tmp_path, cli):
    folder = shared_data / "mind-small-sample"
    r = cli("data", "prepare", "-f", "mind", "-i", folder, "-o", tmp_path / "mind", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    rows = [line.split("\t") for line in (folder / "behaviors.tsv").read_text().splitlines()]
    imps = [x for row in rows for x in row[4].split()]
    assert s["events_per_action"]["click"] == sum(x.endswith("-1") for x in imps) == 7542
    assert s["events_per_action"]["impression"] == sum(x.endswith("-0") for x in imps)
    first = {}
    for row in sorted(rows, key=lambda r: dt.datetime.strptime(r[2], "%m/%d/%Y %I:%M:%S %p")):
        first.setdefault(row[1], row)
    assert s["events_per_action"]["history"] == sum(len(r[3].split()) for r in first.values())
    assert s["users"] == len({row[1] for row in rows}) and "history clicks have no times" in s["notes"][0]
    ds = Dataset.open(tmp_path / "mind")
    ev = ds.events().join(ds.users, on="user").join(ds.items.select("item", "item_id"), on="item")
    codes = {a.name: a.code for a in ds.manifest.actions}
    # an impression keeps its request id; history comes in its order, before the user's first request
    row = rows[0]
    req = ev.filter(pl.col("detail") == row[0]).sort("item_id")
    assert sorted(req["item_id"].to_list()) == sorted(x.rsplit("-", 1)[0] for x in row[4].split())
    u = first[row[1]]
    hist = ev.filter((pl.col("user_id") == row[1]) & (pl.col("action") == codes["history"])).sort("ts",
                                                                                                maintain_order=True)
    t_first = int(dt.datetime.strptime(u[2], "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=dt.timezone.utc).timestamp())
    assert hist["item_id"].to_list() == u[3].split() and hist["ts"].max() < t_first


def test_ranking_readers_bad_input(tmp_path, cli):
    (tmp_path / "tb.csv").write_text("1,2,3,pv,1511544070\n1,2,3,purchase,1511544071\n")
    r = cli("data", "prepare", "-f", "taobao", "-i", tmp_path / "tb.csv", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "tb.csv, line 2: unknown behaviour type" in r.stderr
    (tmp_path / "h.csv").write_text("user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,1511544070\n")
    r = cli("data", "prepare", "-f", "taobao", "-i", tmp_path / "h.csv", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "has a header line" in r.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "behaviors.tsv").write_text("1\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN3-1 N4-0\n"
                                                  "2\tU2\t11/12/2019 2:15:00 PM\t\tN3-2\n")
    r = cli("data", "prepare", "-f", "mind", "-i", tmp_path / "m", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "behaviors.tsv, line 2: impression is not NEWS_ID-0 or NEWS_ID-1" in r.stderr
    (tmp_path / "m" / "behaviors.tsv").write_text("1\tU1\t2019-11-12 14:14:46\tN1\tN3-1\n")
    r = cli("data", "prepare", "-f", "mind", "-i", tmp_path / "m", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "time is not parseable" in r.stderr and "M/D/YYYY h:mm:ss AM/PM" in r.stderr
    r = cli("data", "prepare", "-f", "mind", "-i", tmp_path / "nowhere", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "missing file behaviors.tsv" in r.stderr
