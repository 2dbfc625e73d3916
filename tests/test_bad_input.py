"""Every kind of bad input gets a clear message (file, line, text, expectation) and a non-zero exit,
or, with --skip-invalid, an exact count of what was skipped. Nothing is left half-written."""

import json
import shutil
from pathlib import Path

import pytest

from pinnerformer.data import Dataset

MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
RATINGS = ["1::1::5::978300760", "1::2::3::978302109", "2::1::4::978301968", "2::2::1::978300275"]


def ml1m(folder: Path, lines=RATINGS, movies=MOVIES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    (folder / "movies.dat").write_text(movies, encoding="latin-1")
    return folder


def prepare(cli, src, out, *extra, fmt="movielens"):
    return cli("data", "prepare", "--format", fmt, "--input", src, "--output", out, *extra)


def replace_line(lines, i, text):
    out = list(lines)
    out[i - 1] = text
    return out


@pytest.mark.parametrize("bad, problem, found", [
    ("1::1::978300760", "line 3: malformed line: 3 field(s) where 4 were expected", "1::1::978300760"),
    ("1,1,5,978300760", "line 3: malformed line: 1 field(s) where 4 were expected (the line looks comma-separated",
     "1,1,5,978300760"),
    ("x1::1::5::978300760", "line 3: user id is not an integer", "x1"),
    ("2::1::5::97830x760", "line 3: timestamp is not an integer", "97830x760"),
    ("2::1::5::4102444800", "line 3: timestamp outside the sane range", "4102444800"),
    ("2::1::5::1", "line 3: timestamp outside the sane range", "1"),
    ("2::1::9::978300760", "line 3: unknown rating value", "9.0"),
    ("2::1::five::978300760", "line 3: rating is not a number", "five"),
])
def test_bad_line_names_file_line_and_text(cli, tmp_path, bad, problem, found):
    src = ml1m(tmp_path / "src", replace_line(RATINGS, 3, bad))
    r = prepare(cli, src, tmp_path / "out")
    assert r.exit_code == 2
    assert f"{src / 'ratings.dat'}, {problem}" in r.stderr
    assert f"found:    {found!r}" in r.stderr
    assert "expected:" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_malformed_line_in_copy_of_real_ratings_dat(cli, shared_data, tmp_path):
    src = tmp_path / "ml1m"
    src.mkdir()
    shutil.copy(shared_data / "movielens-1m-subset" / "movies.dat", src)
    lines = (shared_data / "movielens-1m-subset" / "ratings.dat").read_text().splitlines()
    lines[123_456] = "17::3114::4"  # line 123,457 loses its timestamp
    (src / "ratings.dat").write_text("\n".join(lines) + "\n")
    r = prepare(cli, src, tmp_path / "out")
    assert r.exit_code != 0
    assert "ratings.dat, line 123457: malformed line: 3 field(s) where 4 were expected" in r.stderr
    assert "'17::3114::4'" in r.stderr


def test_skip_invalid_counts_every_reason(cli, tmp_path):
    lines = RATINGS + ["3::1::5", "3::x::5::978300760", "3::2::0::978300760", "3::1::5::12", "", "3::1::4::978300999"]
    src = ml1m(tmp_path / "src", lines)
    r = prepare(cli, src, tmp_path / "out", "--skip-invalid")
    assert r.exit_code == 0, r.output
    m = Dataset.open(tmp_path / "out").manifest
    assert m.n_events == 5
    assert m.skipped == {"blank_lines": 1, "malformed_lines": 1, "non_integer_item": 1, "unknown_rating": 1,
                         "time_out_of_range": 1}
    assert "malformed_lines: 1" in r.stdout


def test_duplicates_are_removed_and_counted(cli, tmp_path):
    src = ml1m(tmp_path / "src", RATINGS + [RATINGS[0], RATINGS[0], "1::1::4::978300760"])
    r = prepare(cli, src, tmp_path / "out")
    assert r.exit_code == 0, r.output
    m = Dataset.open(tmp_path / "out").manifest
    # two exact copies go; the same (user, item, time) with another rating is a different action: kept
    assert m.duplicates_removed == 2 and m.n_events == 5
    assert "duplicates removed │ 2" in r.stdout


def test_missing_files_and_folders(cli, tmp_path):
    r = prepare(cli, tmp_path / "nope", tmp_path / "out")
    assert r.exit_code == 2 and "input not found" in r.stderr
    src = ml1m(tmp_path / "src")
    (src / "movies.dat").unlink()
    r = prepare(cli, src, tmp_path / "out")
    assert r.exit_code == 2 and "missing file movies.dat" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = prepare(cli, empty, tmp_path / "out")
    assert r.exit_code == 2 and "none of ratings.dat, u.data found" in r.stderr


def test_no_events(cli, tmp_path):
    src = ml1m(tmp_path / "src", [])
    (src / "ratings.dat").write_text("")
    r = prepare(cli, src, tmp_path / "out")
    assert r.exit_code == 2 and "the input yields no events" in r.stderr
    src = ml1m(tmp_path / "src2", ["1::1::9::978300760"])
    r = prepare(cli, src, tmp_path / "out", "--skip-invalid")
    assert r.exit_code == 2 and "yields no events" in r.stderr and "unknown_rating" in r.stderr


def write_latest(folder: Path, ratings: str, tags: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(ratings)
    (folder / "movies.csv").write_text('movieId,title,genres\n1,"Heat, the movie (1995)",Action|Crime\n2,X (1990),(no genres listed)\n')
    if tags is not None:
        (folder / "tags.csv").write_text(tags)
    return folder


def test_movielens_latest_wrong_delimiter_and_ragged(cli, tmp_path):
    src = write_latest(tmp_path / "a", "userId;movieId;rating;timestamp\n1;1;4.0;964982703\n")
    r = prepare(cli, src, tmp_path / "out", fmt="movielens-latest")
    assert r.exit_code == 2
    assert "ratings.csv, line 1: header is not comma-separated (the line looks semicolon-separated" in r.stderr
    src = write_latest(tmp_path / "b", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964982704,7\n")
    r = prepare(cli, src, tmp_path / "out", fmt="movielens-latest")
    assert r.exit_code == 2 and "ratings.csv, line 3: malformed line: 5 field(s) where 4 were expected" in r.stderr
    src = write_latest(tmp_path / "c", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2\n")
    r = prepare(cli, src, tmp_path / "out", fmt="movielens-latest")
    assert r.exit_code == 2 and "ratings.csv, line 3: missing value" in r.stderr
    src = write_latest(tmp_path / "d", "userId,movieId,stars,timestamp\n1,1,4.0,964982703\n")
    r = prepare(cli, src, tmp_path / "out", fmt="movielens-latest")
    assert r.exit_code == 2 and "unexpected header" in r.stderr and "userId,movieId,rating,timestamp" in r.stderr


def test_movielens_latest_half_stars_tags_and_quoted_titles(cli, tmp_path):
    src = write_latest(tmp_path / "a", "userId,movieId,rating,timestamp\n1,1,4.5,964982703\n1,2,0.5,964982704\n",
                       "userId,movieId,tag,timestamp\n1,1,\"gritty, long\",964982705\n1,1,heist,964982705\n")
    r = prepare(cli, src, tmp_path / "out", fmt="movielens-latest")
    assert r.exit_code == 0, r.output
    ds = Dataset.open(tmp_path / "out")
    assert ds.manifest.events_per_action == {"love": 0, "like": 1, "neutral": 0, "dislike": 1, "tag": 2}
    assert ds.events()["detail"].to_list() == ["4.5", "0.5", "gritty, long", "heist"]
    assert ds.items["text"].to_list() == ["Heat, the movie (1995). Genres: Action, Crime", "X (1990). Genres: "]


def test_bad_rating_rule_and_positive(cli, tmp_path):
    src = ml1m(tmp_path / "src")
    r = prepare(cli, src, tmp_path / "out", "--rating-rule", "5=love,4-5=like")
    assert r.exit_code == 2 and "rating rule ranges overlap" in r.stderr
    r = prepare(cli, src, tmp_path / "out", "--rating-rule", "five=love")
    assert r.exit_code == 2 and "cannot parse rating rule entry" in r.stderr
    r = prepare(cli, src, tmp_path / "out", "--positive", "adore")
    assert r.exit_code == 2 and "positive action(s) adore are not action types" in r.stderr


def test_unknown_format_and_existing_output(cli, tmp_path):
    src = ml1m(tmp_path / "src")
    r = prepare(cli, src, tmp_path / "out", fmt="netflix")
    assert r.exit_code == 2 and "unknown format 'netflix'" in r.stderr
    assert prepare(cli, src, tmp_path / "out").exit_code == 0
    r = prepare(cli, src, tmp_path / "out")
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert prepare(cli, src, tmp_path / "out", "--overwrite").exit_code == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("…")
    r = prepare(cli, src, precious, "--overwrite")
    assert r.exit_code == 2 and "is not a prepared dataset" in r.stderr and (precious / "thesis.tex").exists()


def test_options_of_another_format_are_errors_not_ignored(cli, tmp_path):
    src = ml1m(tmp_path / "src")
    r = prepare(cli, src, tmp_path / "out", "--user-col", "uid")
    assert r.exit_code == 2 and "--user-col does not apply to --format movielens (it is for events)" in r.stderr
    r = prepare(cli, src, tmp_path / "out", "--item-attributes", tmp_path / "a.json")
    assert r.exit_code == 2 and "--item-attributes does not apply to --format movielens (it is for sequences)" \
        in r.stderr
    (tmp_path / "s.txt").write_text("1 5 6 7\n")
    r = prepare(cli, tmp_path / "s.txt", tmp_path / "seq", "--id-type", "float", fmt="sequences")
    assert r.exit_code == 2 and "id_type: unknown id type 'float' (expected one of: auto, int, str)" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "seq").exists()


def test_sequences_take_the_attribute_file_named_for_them(cli, tmp_path):
    """A folder of several datasets, as the published sequential-recommendation code ships them: each file takes its
    own FILE-STEM_item2attributes.json; with several and none of its own, prepare stops and says which to name."""
    (tmp_path / "Toys.txt").write_text("1 5 6 7\n2 6 7\n")
    (tmp_path / "Toys_item2attributes.json").write_text(json.dumps({"5": [1], "6": [2, 3], "7": [3]}))
    (tmp_path / "Yelp_item2attributes.json").write_text(json.dumps({"5": [9], "6": [9], "7": [9]}))
    (tmp_path / "Sports_item2attributes.json").write_text(json.dumps({"5": [8]}))
    assert prepare(cli, tmp_path / "Toys.txt", tmp_path / "toys", fmt="sequences").exit_code == 0
    items = Dataset.open(tmp_path / "toys").items.sort("item_id")
    assert items["interests"].to_list() == [["1"], ["2", "3"], ["3"]]
    (tmp_path / "Toys_item2attributes.json").unlink()
    r = prepare(cli, tmp_path / "Toys.txt", tmp_path / "toys2", fmt="sequences")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "Toys.txt" in r.stderr
    assert "2 item attribute file(s) beside the sequences (Sports_item2attributes.json, Yelp_item2attributes.json), " \
        "none named Toys_item2attributes.json" in r.stderr and "--item-attributes" in r.stderr
    assert not (tmp_path / "toys2").exists()
    r = prepare(cli, tmp_path / "Toys.txt", tmp_path / "toys2", "--item-attributes",
                tmp_path / "Yelp_item2attributes.json", fmt="sequences")
    assert r.exit_code == 0 and set(Dataset.open(tmp_path / "toys2").items["interests"].explode()) == {"9"}
    # one file named for another dataset is no more its own than two are (item ids overlap across datasets)
    (tmp_path / "Sports_item2attributes.json").unlink()
    r = prepare(cli, tmp_path / "Toys.txt", tmp_path / "toys3", fmt="sequences")
    assert r.exit_code == 2 and "1 item attribute file(s) beside the sequences (Yelp_item2attributes.json)" in r.stderr
    # a plain item2attributes.json belongs to whatever file is beside it
    (tmp_path / "Yelp_item2attributes.json").rename(tmp_path / "item2attributes.json")
    assert prepare(cli, tmp_path / "Toys.txt", tmp_path / "toys3", fmt="sequences").exit_code == 0
    assert set(Dataset.open(tmp_path / "toys3").items["interests"].explode()) == {"9"}


def test_interrupted_prepare_leaves_nothing_that_looks_complete(cli, tmp_path, monkeypatch):
    from pinnerformer.data import timelines

    src = ml1m(tmp_path / "src")
    assert prepare(cli, src, tmp_path / "out").exit_code == 0
    before = Dataset.open(tmp_path / "out").manifest.fingerprint

    def crash(self, folder):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(timelines.Timelines, "save", crash)
    src2 = ml1m(tmp_path / "src2", RATINGS[:2])
    r = prepare(cli, src2, tmp_path / "out", "--overwrite")
    assert r.exit_code != 0
    assert Dataset.open(tmp_path / "out").manifest.fingerprint == before  # old dataset intact
    r = prepare(cli, src2, tmp_path / "new")
    assert r.exit_code != 0 and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "src2"]  # no temporary left behind


def test_dataset_dir_without_manifest(cli, tmp_path):
    (tmp_path / "half").mkdir()
    r = cli("data", "stats", tmp_path / "half")
    assert r.exit_code == 2 and "no manifest.json" in r.stderr


def test_overwrite_through_a_symlink_is_refused(cli, tmp_path):
    src = ml1m(tmp_path / "src")
    assert prepare(cli, src, tmp_path / "real").exit_code == 0
    before = Dataset.open(tmp_path / "real").manifest.fingerprint
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = prepare(cli, ml1m(tmp_path / "src2", RATINGS[:2]), tmp_path / "link", "--overwrite")
    assert r.exit_code == 2 and "is a symbolic link" in r.stderr
    assert (tmp_path / "link").is_symlink() and Dataset.open(tmp_path / "real").manifest.fingerprint == before
