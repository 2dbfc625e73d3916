"""The generic `events` format (CSV and Parquet with a column mapping), and `otto`/`sequences` edge cases."""

import json

import polars as pl
import pytest

from pinnerformer.data import Dataset

CSV = """uid,pin,act,when,where,secs
u2,p1,click,2024-01-02T10:00:00,home,12.5
u1,p2,save,2024-01-01T09:00:00,search,
u1,p1,click,2024-01-01T09:00:00,,3
u1,p3,hide,2024-01-01T08:00:00,home,0
u2,p1,click,2024-01-02T10:00:00,home,12.5
"""
MAP = ["--user-col", "uid", "--item-col", "pin", "--action-col", "act", "--time-col", "when",
       "--surface-col", "where", "--duration-col", "secs", "--time-format", "iso"]


def prepare(cli, src, out, *extra):
    return cli("data", "prepare", "--format", "events", "--input", src, "--output", out, *extra)


def test_csv_with_full_mapping(cli, tmp_path):
    (tmp_path / "log.csv").write_text(CSV)
    (tmp_path / "items.csv").write_text("pin,title,topics\np1,Red chair,furniture|red\np2,Blue sofa,furniture\n")
    r = prepare(cli, tmp_path / "log.csv", tmp_path / "out", *MAP, "--positive", "save,click",
                "--items", tmp_path / "items.csv", "--items-id-col", "pin", "--items-text-col", "title",
                "--items-interests-col", "topics")
    assert r.exit_code == 0, r.output
    ds = Dataset.open(tmp_path / "out")
    m = ds.manifest
    assert (m.n_events, m.n_users, m.n_items, m.duplicates_removed) == (4, 2, 3, 1)
    assert m.action_names() == ["click", "hide", "save"] and [a.name for a in m.actions if a.positive] == ["click", "save"]
    assert m.surfaces == ["home", "search"] and m.has_duration
    ev = ds.events()
    # u1's events sorted by time; the two 09:00 events keep their input order (save before click)
    u1 = ev.filter(pl.col("user") == 0)
    assert [m.actions[a].name for a in u1["action"]] == ["hide", "save", "click"]
    assert u1["surface"].to_list() == [0, 1, None] and u1["duration"].to_list()[0] == 0.0
    assert u1["duration"].is_null().to_list() == [False, True, False]
    assert u1["ts"][0] == 1704096000  # 2024-01-01T08:00:00Z
    tl = ds.timelines.user(0)
    assert tl.surface.tolist() == [0, 1, -1] and tl.duration[1] != tl.duration[1]  # NaN = unknown
    items = ds.items.sort("item")
    assert items["interests"].to_list() == [["furniture", "red"], ["furniture"], []]
    assert m.notes == ["1 item(s) with events have no row in the item table (no text, no interests)"]


def test_parquet_input_and_datetime_column(cli, tmp_path):
    df = pl.DataFrame({"user": [5, 5, 7], "item": [10, 11, 10],
                       "timestamp": pl.Series(["2023-05-01 10:00:00", "2023-05-01 11:00:00", "2023-05-02 00:00:00"]).str.to_datetime()})
    df.write_parquet(tmp_path / "log.parquet")
    r = prepare(cli, tmp_path / "log.parquet", tmp_path / "out")
    assert r.exit_code == 0, r.output
    ds = Dataset.open(tmp_path / "out")
    assert ds.manifest.action_names() == ["interact"] and ds.users["user_id"].to_list() == [5, 7]
    bad = df.with_columns(pl.Series("user", [5, None, 7]))
    bad.write_parquet(tmp_path / "bad.parquet")
    r = prepare(cli, tmp_path / "bad.parquet", tmp_path / "out2")
    assert r.exit_code == 2 and "bad.parquet, row 2: missing value (field 'user')" in r.stderr


@pytest.mark.parametrize("content, extra, message", [
    ("user,item\n1,2\n", [], "missing column(s) timestamp"),
    ("user;item;timestamp\n1;2;3\n", [], "line 1: header is not comma-separated (the line looks semicolon-separated"),
    ("user,item,timestamp\n1,2,1700000000\n1,3,yesterday\n", [], "line 3: timestamp is not parseable"),
    ("user,item,timestamp\n1,2,2023-13-45\n", ["--time-format", "%Y-%m-%d"], "line 2: timestamp is not parseable"),
    ("user,item,timestamp,act\n1,2,1700000000,click\n1,2,1700000001,zap\n", ["--action-col", "act", "--actions",
     "click,save", "--positive", "click"], "line 3: unknown action value"),
    ("user,item,timestamp,act\n1,2,1700000000,click\n", ["--action-col", "act"], "no positive actions given"),
    ("user,item,timestamp\n1,2,1700000000\nx,2,1700000001\n", ["--id-type", "int"], "line 3: id is not an integer"),
    ("user,item,timestamp,d\n1,2,1700000000,-4\n", ["--duration-col", "d"], "line 2: duration is not a non-negative number"),
    ("user,item,timestamp\n", [], "the input yields no events"),
])
def test_events_bad_input(cli, tmp_path, content, extra, message):
    (tmp_path / "log.csv").write_text(content)
    r = prepare(cli, tmp_path / "log.csv", tmp_path / "out", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.stderr


def test_unix_ms_dedup_at_source_resolution_and_order_clock(cli, tmp_path):
    # two clicks 300 ms apart are two events, even though both land in the same second
    (tmp_path / "log.csv").write_text("user,item,timestamp\n1,2,1700000000100\n1,2,1700000000400\n1,2,1700000000400\n")
    r = prepare(cli, tmp_path / "log.csv", tmp_path / "out", "--time-format", "unix-ms")
    assert r.exit_code == 0, r.output
    m = Dataset.open(tmp_path / "out").manifest
    assert (m.n_events, m.duplicates_removed, m.time_min) == (2, 1, 1700000000)
    r = prepare(cli, tmp_path / "log.csv", tmp_path / "ord", "--time-format", "order")
    ds = Dataset.open(tmp_path / "ord")
    assert ds.manifest.clock == "order" and ds.timelines.user(0).ts.tolist() == [0, 1, 2]


def test_sequences_bad_input(cli, tmp_path):
    (tmp_path / "s.txt").write_text("1 5 6\n2\n")
    r = cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "s.txt, line 2: line has a user id but no items" in r.stderr
    (tmp_path / "s.txt").write_text("1 5 6\n2 7\n1 8\n")
    r = cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "line 3: user '1' has more than one line (first on line 1)" in r.stderr


def test_otto_bad_json_names_line(cli, tmp_path):
    good = '{"session":1,"events":[{"aid":5,"ts":1659304800025,"type":"clicks"}]}'
    (tmp_path / "t.jsonl").write_text(good + "\n" + '{"session":2,"events":[{"aid":6,"ts":1659304800025,"type":"clicks"}\n')
    r = cli("data", "prepare", "-f", "otto", "-i", tmp_path / "t.jsonl", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "t.jsonl, line 2: malformed JSON" in r.stderr
    (tmp_path / "t.jsonl").write_text(good + "\n" + good.replace("clicks", "wishlist").replace('"session":1', '"session":2') + "\n")
    r = cli("data", "prepare", "-f", "otto", "-i", tmp_path / "t.jsonl", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "line 2: unknown event type" in r.stderr and "'wishlist'" in r.stderr


def test_ids_written_as_1_and_1_0_are_one_user_and_one_item(cli, tmp_path):
    """Found by a fault probe: ids `1` and `1.0` became two users; a float Parquet id column became strings."""
    (tmp_path / "log.csv").write_text("user,item,timestamp\n1,7,1700000000\n1.0,7.0,1700000001\n2,8,1700000002\n")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "a").exit_code == 0
    ds = Dataset.open(tmp_path / "a")
    assert ds.users["user_id"].to_list() == [1, 2] and ds.items["item_id"].to_list() == [7, 8]
    pl.DataFrame({"user": [1.0, 2.0], "item": [7.0, 7.0], "timestamp": [1700000000, 1700000001]}).write_parquet(
        tmp_path / "log.parquet")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.parquet", "-o", tmp_path / "b").exit_code == 0
    assert Dataset.open(tmp_path / "b").users["user_id"].dtype == pl.Int64
    pl.DataFrame({"user": [[1], [2]], "item": [7, 7], "timestamp": [1700000000, 1700000001]}).write_parquet(
        tmp_path / "list.parquet")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "list.parquet", "-o", tmp_path / "c")
    assert r.exit_code == 2 and "column 'user' holds List(Int64) values" in r.stderr
    pl.DataFrame({"user": [1, 2], "item": [7, 7], "timestamp": [[1], [2]]}).write_parquet(tmp_path / "lt.parquet")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "lt.parquet", "-o", tmp_path / "c")
    assert r.exit_code == 2 and "column 'timestamp' holds List(Int64) values" in r.stderr
    (tmp_path / "huge.csv").write_text("user,item,timestamp\n1,2,9223372036854776.0\n")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "huge.csv", "-o", tmp_path / "d")
    assert r.exit_code == 2 and "timestamp is not parseable" in r.stderr and "Traceback" not in r.output


def test_byte_order_marks_and_cut_off_last_lines(cli, tmp_path, shared_data):
    """Found by a fault probe: a UTF-8 BOM renamed the first user; a UTF-16 file gave a decoding error without
    saying so; a file cut inside its last line made a new action type of the cut-off word."""
    (tmp_path / "bom.txt").write_bytes("u1 a b\nu2 b c\n".encode("utf-8-sig"))
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "bom.txt", "-o", tmp_path / "s").exit_code == 0
    assert Dataset.open(tmp_path / "s").users["user_id"].to_list() == ["u1", "u2"]
    (tmp_path / "u16.txt").write_bytes("u1 a b\n".encode("utf-16"))
    r = cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "u16.txt", "-o", tmp_path / "t")
    assert r.exit_code == 2 and "is UTF-16 (little-endian) text" in r.stderr
    # the real Taobao sample ends inside its last line (`100370,1968385,1875258,pv`, no timestamp)
    tail = (shared_data / "taobao-userbehavior-head" / "UserBehavior.csv").read_bytes()[-400:].split(b"\n", 1)[1]
    assert not tail.endswith(b"\n")
    (tmp_path / "tb.csv").write_bytes(b"user,item,category,action,timestamp\n" + tail)
    args = ["data", "prepare", "-f", "events", "-i", tmp_path / "tb.csv", "--action-col", "action", "--actions",
            "pv,cart,fav,buy", "--positive", "buy,cart,fav,pv"]
    n_lines = tail.count(b"\n") + 1
    r = cli(*args, "-o", tmp_path / "tb")
    assert r.exit_code == 2 and f"tb.csv, line {n_lines + 1}: the file does not end with a newline" in r.stderr
    r = cli(*args, "-o", tmp_path / "tb", "--skip-invalid", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["skipped"] == {"truncated_last_line": 1} and s["events"] == n_lines - 1
    assert set(s["events_per_action"]) == {"pv", "cart", "fav", "buy"}  # no action type made of a cut-off word


def test_clear_messages_for_iso_offsets_unbalanced_quotes_binary_files_and_paths(cli, tmp_path):
    """Found by a fault probe: ISO times with Z or an offset were rejected as not ISO-8601; an unbalanced quote was
    reported 50 lines late, at the end of the file; binary input; an output path under a regular file."""
    (tmp_path / "iso.csv").write_text("user,item,timestamp\n1,2,2020-01-01T00:00:00Z\n1,3,2020-01-01T03:00:00+02:00\n"
                                      "1,4,2020-01-01 02:00:00.5\n2,2,2020-01-02\n")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "iso.csv", "-o", tmp_path / "iso", "--time-format",
            "iso")
    assert r.exit_code == 0, r.output
    ts = Dataset.open(tmp_path / "iso").events()["ts"].to_list()
    assert ts == [1577836800, 1577840400, 1577844000, 1577923200]  # Z, +02:00 -> UTC, naive = UTC, a date
    (tmp_path / "q.csv").write_text("user,item,timestamp\n1,2,1600000000\n3,\"4,1600000000\n"
                                    + "".join(f"{i},5,1600000000\n" for i in range(50)))
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "q.csv", "-o", tmp_path / "q")
    assert r.exit_code == 2 and "q.csv, line 3: a quoted field opens on line 3 and is never closed" in r.stderr
    (tmp_path / "z.csv").write_bytes(b"user,item,timestamp\n\x1f\x8b\x08\x00\x00\x00binary")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "z.csv", "-o", tmp_path / "z")
    assert r.exit_code == 2 and "the file looks binary" in r.stderr and "\\x8b" not in r.stderr
    (tmp_path / "afile").write_text("x")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "iso.csv", "-o", tmp_path / "afile" / "ds",
            "--time-format", "iso")
    assert r.exit_code == 2 and "afile" in r.stderr and "Traceback" not in r.output
