"""Property-based fuzzing of the readers (hypothesis): whatever the bytes, a reader either gives a clear error
(`PinnerformerError`, exit 2 on the command line) or a log in which every input line is accounted for — loaded or
counted as skipped by reason. Never a traceback, never a silent drop."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinnerformer.data.formats import read_source
from pinnerformer.data.prepare import prepare
from pinnerformer.errors import PinnerformerError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALPHABET = string.ascii_letters + string.digits + " \t,:;|.-_\"'\\{}[]é\u00a0\ufeff\r"
token = st.one_of(st.integers(-5, 10**12).map(str), st.text(ALPHABET, max_size=6),
                  st.floats(allow_nan=True, allow_infinity=True).map(str))


def lines_of(sep: str, width: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.lists(token, min_size=0, max_size=6).map(sep.join) | width, min_size=1, max_size=25)


def read_or_message(fmt: str, path, tmp_path):
    """The reader, then prepare: (rows read, rows skipped by the reader) — every row accounted for before prepare
    adds its own counts — or None after a PinnerformerError (anything else fails the test). Prepare's counts are
    checked too: its events plus what it skipped and deduplicated are the reader's rows."""
    try:
        raw = read_source(fmt, path, skip_invalid=True)
    except PinnerformerError:
        return None
    read, skipped = raw.events.height, sum(raw.skipped.values())
    try:
        m = prepare(raw, tmp_path / "ds", fmt, skip_invalid=True, overwrite=True, log=lambda s: None)
        later = sum(m.skipped.values()) - skipped - m.skipped.get("catalogue_items_without_events", 0)
        assert m.n_events + m.duplicates_removed + later == read, (m.skipped, read)
    except PinnerformerError:
        pass
    return read, skipped


@SETTINGS
@given(lines=lines_of(" ", st.just("")))
def test_sequences_lines_are_loaded_or_counted(tmp_path, lines):
    path = tmp_path / "seq.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = read_or_message("sequences", path, tmp_path)
    if got is None:
        return
    # a line of k tokens is k - 1 events; blank lines and lines with a user but no item are counted
    text = "\n".join(lines).removeprefix("\ufeff")  # a byte-order mark starting the file is not part of a user id
    tokens = [[t for t in line.strip().split(" ") if t] for line in text.split("\n")]
    assert got == (sum(len(t) - 1 for t in tokens if len(t) >= 2), sum(1 for t in tokens if len(t) < 2)), lines


@SETTINGS
@given(lines=lines_of("::", st.sampled_from(["1::2::5::978300760", "2::3::4.5::978300761", "3::1::1::1"])))
def test_movielens_ratings_lines_are_loaded_or_counted(tmp_path, lines):
    folder = tmp_path / "ml"
    folder.mkdir(exist_ok=True)
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "movies.dat").write_text("1::A (1999)::Drama\n2::B (2000)::Comedy|Drama\n3::C (2001)::Action\n",
                                       encoding="latin-1")
    got = read_or_message("movielens", folder, tmp_path)
    if got is None:
        return
    assert sum(got) == len(lines), (got, lines)  # every line: an event, or counted as skipped


@SETTINGS
@given(lines=lines_of(",", st.sampled_from(["7,8,1700000000", "7,9,1700000001.5", "x,y,2023-01-01"])))
def test_events_csv_rows_are_loaded_or_counted(tmp_path, lines):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\n" + "\n".join(lines) + "\n", encoding="utf-8")
    got = read_or_message("events", path, tmp_path)
    if got is None:
        return
    assert sum(got) >= 1


@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_are_a_message_or_a_log(tmp_path, data):
    for fmt, name in (("sequences", "s.txt"), ("events", "e.csv"), ("otto", "o.jsonl"), ("taobao", "t.csv"),
                      ("mind", "mind/behaviors.tsv")):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        read_or_message(fmt, path.parent if fmt == "mind" else path, tmp_path)


@SETTINGS
@given(lines=lines_of("\t", st.sampled_from(["1\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN3-1 N4-0", "2\tU2\t1/2/2019 "
                                                                                              "9:05:01 AM\t\tN5-0"])))
def test_mind_behaviours_are_loaded_or_counted(tmp_path, lines):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "behaviors.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    read_or_message("mind", tmp_path / "m", tmp_path)
