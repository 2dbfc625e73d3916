"""Input the commands must refuse or handle, found by a fault probe (issue 30): data that would be lost, results that
look right and are not, arguments out of range, damaged files. Each: the exit code, the message (what is wrong,
where, what was expected) and never a traceback."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.requests import RankData, split_counts
from pinnerformer.data.synthetic import planted_request_log
from tests.conftest import run_cli
from tests.test_bad_input import ml1m

# the ranker at its smallest: a few steps, a narrow model (seconds on two CPU cores)
RANK_CFG = {"device": "cpu", "optim": {"batch_size": 64, "max_epochs": 1},
            "data": {"epoch_rows": 256, "max_val_requests": 50},
            "model": {"transact": {"seq_len": 8}, "mlp": [16], "item_id_dim": 4}}


def refused(r, *messages: str, code: int = 2) -> None:
    assert r.exit_code == code, r.output
    for m in messages:
        assert m in r.stderr, (m, r.stderr)
    assert "Traceback" not in r.output


def planted_events(path: Path, keep=None, **kw) -> Path:
    log = planted_request_log(**kw)
    (log if keep is None else log.filter(keep)).write_csv(path)
    return path


def prepare_events(src: Path, out: Path) -> None:
    r = run_cli("data", "prepare", "-f", "events", "-i", src, "-o", out, "--action-col", "action", "--positive",
                "click,save")
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """A dataset of planted requests (80 users, 8 days), its ranking data and a ranker trained for 2 steps."""
    d = tmp_path_factory.mktemp("ranked")
    prepare_events(planted_events(d / "log.csv", n_users=80, days=8), d / "ds")
    r = run_cli("rank", "prepare", "--dataset", d / "ds", "--output", d / "rank", "--heads", "save=save",
                "--pf-max-steps", "3", "--item-vectors", "pinnerformer")
    assert r.exit_code == 0, r.output
    (d / "c.json").write_text(json.dumps(RANK_CFG))
    r = run_cli("rank", "train", "--data", d / "rank", "--output", d / "run", "--config", d / "c.json",
                "--max-steps", "2", "--no-progress")
    assert r.exit_code == 0, r.output
    assert run_cli("rank", "evaluate", "--run", d / "run").exit_code == 0
    return d


# ---- 1. data lost: an append whose first file was seen before ----------------------------------------------------

T0 = 1_600_000_000
MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n2,Jumanji (1995),Adventure\n3,Heat (1995),Action\n"


def ml_latest(folder: Path, ratings: list[tuple], tags: list[tuple] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ratings))
    (folder / "movies.csv").write_text(MOVIES)
    if tags is not None:
        (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n"
                                         + "".join(f"{u},{i},{g},{t}\n" for u, i, g, t in tags))
    return folder


def test_an_append_whose_ratings_were_seen_but_whose_tags_are_new_appends_the_tags(cli, tmp_path):
    from pinnerformer.data.append import find_record
    from pinnerformer.data.prepare import source_files

    ratings0 = [(1, 1, 5.0, T0), (1, 2, 3.0, T0 + 10), (2, 1, 4.0, T0 + 20), (2, 3, 1.0, T0 + 30)]
    ratings1 = [(1, 3, 4.0, T0 + 100), (2, 2, 5.0, T0 + 110), (3, 1, 4.5, T0 + 120)]
    base = ml_latest(tmp_path / "base", ratings0, [(1, 1, "funny", T0 + 40)])
    day1 = ml_latest(tmp_path / "day1", ratings1)
    day1b = ml_latest(tmp_path / "day1b", ratings1, [(3, 2, "classic", T0 + 200), (1, 3, "heist", T0 + 210)])
    ds = tmp_path / "ds"
    assert cli("data", "prepare", "-f", "movielens-latest", "-i", base, "-o", ds).exit_code == 0
    assert cli("data", "append", ds, "-f", "movielens-latest", "-i", day1).exit_code == 0
    r = cli("data", "append", ds, "-f", "movielens-latest", "-i", day1b)
    assert r.exit_code == 0, r.output
    assert "appended 2 events (0 new users, 0 new items, 0 late, 3 duplicates removed)" in r.stderr, r.stderr
    m = Dataset.open(ds).manifest
    assert m.n_events == 5 + 3 + 2 and m.events_per_action["tag"] == 3
    rec = m.lineage[-1]
    assert (rec.events, rec.duplicates_removed, rec.time_min, rec.time_max) == (2, 3, T0 + 200, T0 + 210)
    # the record that brought these files in, for the daily job; the same folder again: nothing to do
    assert find_record(m, source_files([day1b / "ratings.csv", day1b / "movies.csv", day1b / "tags.csv"])) == rec
    assert find_record(m, source_files([day1 / "ratings.csv", day1 / "movies.csv"])) == rec
    assert find_record(m, source_files([base / "ratings.csv"])) is None  # the dataset's own preparation
    r = cli("data", "append", ds, "-f", "movielens-latest", "-i", day1b)
    assert r.exit_code == 0 and "already in" in r.stderr and Dataset.open(ds).manifest.n_events == 10


# ---- 2. rank prepare's output: a race, and what --overwrite may replace -------------------------------------------

def test_rank_prepare_never_takes_over_an_output_another_prepare_wrote(ranked, cli, tmp_path, monkeypatch):
    """Two prepares of one output: the second waits for the lock, then finds the first one's output there."""
    import pinnerformer.ranking.prepare as rp

    real, out = rp.exclusive, tmp_path / "rank"

    @contextmanager
    def lock_taken_after_the_other_finished(path, what, **kw):
        shutil.copytree(ranked / "rank", out)  # the other prepare's output, complete
        with real(path, what, **kw):
            yield

    monkeypatch.setattr(rp, "exclusive", lock_taken_after_the_other_finished)
    r = cli("rank", "prepare", "--dataset", ranked / "ds", "--output", out, "--heads", "save=save",
            "--pf-max-steps", "3")
    refused(r, f"{out} already exists", "--overwrite")
    assert (out / "manifest.json").read_bytes() == (ranked / "rank" / "manifest.json").read_bytes()


def test_rank_prepare_overwrites_only_ranking_data(ranked, cli, tmp_path):
    def prepare(out, *extra):
        return cli("rank", "prepare", "--dataset", ranked / "ds", "--output", out, "--heads", "save=save", *extra)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(prepare(other, "--overwrite"), f"{other} is not ranking data", "refusing to replace it")
    assert (other / "notes.txt").read_text() == "mine"
    refused(prepare(ranked / "ds", "--overwrite"), "is not ranking data")  # a prepared dataset
    assert Dataset.open(ranked / "ds").manifest.n_events > 0
    file = tmp_path / "out.txt"
    file.write_text("a file")
    for extra in ((), ("--overwrite",)):
        refused(prepare(file, *extra), f"{file} is a file, not a ranking data directory")
        assert file.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["other", "out.txt"]
    # ranking data of ours may be replaced: the check lets it through (the bad split then stops this prepare)
    mine = tmp_path / "mine"
    shutil.copytree(ranked / "rank", mine)
    refused(prepare(mine, "--overwrite", "--split", "0.5,0.5,0"), "--split")
    assert (mine / "manifest.json").read_bytes() == (ranked / "rank" / "manifest.json").read_bytes()


# ---- 3. logged requests on data without request ids ---------------------------------------------------------------

def test_logged_requests_are_refused_on_data_without_request_ids(cli, tmp_path):
    assert cli("data", "prepare", "-f", "movielens", "-i", ml1m(tmp_path / "src"), "-o", tmp_path / "ds").exit_code == 0
    r = cli("rank", "prepare", "--dataset", tmp_path / "ds", "--output", tmp_path / "r", "--request", "logged")
    refused(r, "--request logged", "request id", "movielens", "--request day or --request session")
    assert not (tmp_path / "r").exists()


# ---- 4. periods too small to select a model on --------------------------------------------------------------------

def test_a_validation_period_of_two_requests_is_refused_by_prepare(cli, tmp_path):
    # 8 days of 80 day-requests, but only 2 on day 5: the split below makes day 5 the validation period
    day5 = (pl.col("timestamp") // 86400 == 1_600_041_600 // 86400 + 5)
    prepare_events(planted_events(tmp_path / "log.csv", ~day5 | (pl.col("user") < 2), n_users=80, days=8),
                   tmp_path / "ds")
    r = cli("rank", "prepare", "--dataset", tmp_path / "ds", "--output", tmp_path / "r", "--heads", "save=save",
            "--split", "0.712,0.05,0.238", "--pf-max-steps", "3")
    refused(r, "the validation period holds 2 request(s)", "at least 10")
    assert not (tmp_path / "r").exists()
    assert "at least 10 requests" in " ".join(cli("rank", "prepare", "--help").stdout.split())


def test_a_split_by_dates_that_cannot_be_used_is_refused_naming_split(cli, tmp_path):
    """--split TRAIN_LAST,VALIDATION_LAST: a day that is no day, days out of order, a day outside the requests'
    span (2020-09-14 .. 2020-09-19 here), or a period left empty: refused before any model is trained, naming
    --split (and the span); --min-candidates below 2, or above --max-candidates, likewise."""
    prepare_events(planted_events(tmp_path / "log.csv", n_users=20, days=6), tmp_path / "ds")

    def prepare(*extra):
        return cli("rank", "prepare", "--dataset", tmp_path / "ds", "--output", tmp_path / "r", "--heads", "save=save",
                   "--pf-max-steps", "1", *extra)

    cases = [
        ("2020-09-1x,2020-09-17", ["--split '2020-09-1x,2020-09-17': '2020-09-1x' is not a day (expected YYYY-MM-DD)"]),
        ("2020-02-30,2020-09-17", ["'2020-02-30' is not a day"]),
        ("0.7,0.3", ["--split '0.7,0.3': expected three fractions", "or two UTC days TRAIN_LAST,VALIDATION_LAST"]),
        ("2020-09-16", ["--split '2020-09-16': expected three fractions"]),
        ("2020-09-17,2020-09-15", ["--split 2020-09-17,2020-09-15: the training period's last day (2020-09-17) must "
                                   "come before the validation period's last day (2020-09-15)"]),
        ("2020-09-16,2020-09-16", ["must come before"]),
        ("2020-09-01,2020-09-17", ["--split 2020-09-01,2020-09-17: 2020-09-01 is outside the requests' days, "
                                   "2020-09-14 (the first request's) to 2020-09-19 (the last one's), UTC"]),
        ("2020-09-16,2020-10-01", ["2020-10-01 is outside the requests' days, 2020-09-14"]),
        ("2020-09-16,2020-09-19", ["--split 2020-09-16,2020-09-19: the test period would hold no request",
                                   "test after"]),
        ("-0.1,0.6,0.5", ["--split -0.1,0.6,0.5: expected three positive fractions"]),
    ]
    for split, messages in cases:
        refused(prepare("--split", split), *messages)
        assert not (tmp_path / "r").exists()
    refused(prepare("--min-candidates", "1"), "--min-candidates")
    refused(prepare("--min-candidates", "7", "--max-candidates", "5"), "--min-candidates 7 is above --max-candidates 5")
    assert "2001-03-23,2001-11-22" in " ".join(cli("rank", "prepare", "--help").stdout.split())


@pytest.fixture
def tiny_validation(ranked, tmp_path):
    """The ranking data with all but 2 validation requests moved to training, and those 2 without a save: no
    validation metric can be computed (ranking data prepared before `rank prepare` refused such periods)."""
    d = tmp_path / "rank"
    shutil.copytree(ranked / "rank", d)
    req, cand = pl.read_parquet(d / "requests.parquet"), pl.read_parquet(d / "candidates.parquet")
    val = req.filter(pl.col("split") == 1)["request"]
    keep = val[:2]
    moved = pl.col("request").is_in(val[2:].implode())
    req = req.with_columns(pl.when(moved).then(0).otherwise(pl.col("split")).cast(pl.Int8).alias("split"))
    cand = cand.with_columns(pl.when(pl.col("request").is_in(keep.implode())).then(0).otherwise(pl.col("y_save"))
                             .cast(pl.UInt8).alias("y_save"))
    req.write_parquet(d / "requests.parquet")
    cand.write_parquet(d / "candidates.parquet")
    m = json.loads((d / "manifest.json").read_text())
    heads = RankData(ranked / "rank").heads
    m["splits"] = {k: v.model_dump() for k, v in split_counts(req, cand, heads).items()}
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def strict_json(text: str):
    def no_constant(name):
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=no_constant)


def test_rank_train_refuses_a_validation_period_too_small_and_never_writes_nan(ranked, tiny_validation, cli,
                                                                               tmp_path, monkeypatch):
    args = ("rank", "train", "--data", tiny_validation, "--config", ranked / "c.json", "--max-steps", "2",
            "--no-progress")
    refused(cli(*args, "--output", tmp_path / "run"), "the validation period holds 2 request(s)",
            "no request with an engaged candidate of head save")
    assert not (tmp_path / "run").exists()
    # such a run, made anyway (as before the check): its summary is valid JSON, and evaluating it says what is wrong
    import pinnerformer.training.ranking as tr

    monkeypatch.setattr(tr, "check_periods", lambda *a, **k: None)
    r = cli(*args, "--output", tmp_path / "old")
    assert r.exit_code == 0, r.output
    summary = strict_json((tmp_path / "old" / "summary.json").read_text())
    assert summary["best"] is None and summary["best_epoch"] == -1
    monkeypatch.undo()
    refused(cli("rank", "evaluate", "--run", tmp_path / "old"), "no best checkpoint",
            "validation hit@3/save was never defined")


# ---- 5. arguments out of range ------------------------------------------------------------------------------------

def test_arguments_out_of_range_are_refused_naming_the_option(ranked, planted, cli, tmp_path):
    cases = [
        (("train", "-d", planted, "-o", tmp_path / "t", "--max-steps", "-1"), "--max-steps"),
        (("train", "-d", planted, "-o", tmp_path / "t", "--nproc", "0"), "--nproc"),
        (("rank", "train", "--data", ranked / "rank", "-o", tmp_path / "t", "--max-steps", "-5"), "--max-steps"),
        (("rank", "train", "--data", ranked / "rank", "-o", tmp_path / "t", "--nproc", "0"), "--nproc"),
    ]
    for args, option in cases:
        refused(cli(*args), f"Invalid value for '{option}'", "greater than or equal to 1")
        assert not (tmp_path / "t").exists()
    report = ranked / "run" / "eval" / "ranking-test.json"
    before = report.read_bytes()
    refused(cli("rank", "evaluate", "--run", ranked / "run", "-k", "0"), "Invalid value for '-k'",
            "greater than or equal to 1")
    assert report.read_bytes() == before
    ds = Dataset.open(ranked / "ds")
    uid, items = str(ds.users["user_id"][0]), [str(i) for i in ds.items["item_id"][:2]]
    r = cli("rank", "score", "--run", ranked / "run", "--user", uid, "--time", str(T0 + 10 ** 6), "--items",
            f"{items[0]},{items[1]},{items[0]}")
    refused(r, f"--items: candidate id(s) given more than once: '{items[0]}'")
    fp = Dataset.open(planted).manifest.fingerprint
    r = cli("data", "append", planted, "-f", "movielens", "-i", tmp_path / "new")
    refused(r, "--format movielens", f"{planted} was prepared from format events", "--format events")
    assert Dataset.open(planted).manifest.fingerprint == fp


# ---- 6. damaged manifests -----------------------------------------------------------------------------------------

def truncated_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    text = (dst / name).read_text()
    (dst / name).write_text(text[: len(text) // 2])
    return dst / name


def test_a_truncated_manifest_is_named_as_damaged(ranked, planted, cli, tmp_path):
    m = truncated_copy(ranked / "rank", tmp_path / "rank", "manifest.json")
    refused(cli("rank", "train", "--data", tmp_path / "rank", "-o", tmp_path / "run"), f"{m}: damaged or truncated")
    m = truncated_copy(planted, tmp_path / "ds", "manifest.json")
    refused(cli("data", "stats", tmp_path / "ds"), f"{m}: damaged or truncated")
    m = truncated_copy(ranked / "run", tmp_path / "run", "config.json")
    refused(cli("rank", "evaluate", "--run", tmp_path / "run"), f"{m}: damaged or truncated")
    (tmp_path / "pf").mkdir()
    (tmp_path / "pf" / "config.json").write_text('{"task": "retrieval", "conf')
    refused(cli("rank", "prepare", "--dataset", ranked / "ds", "--output", tmp_path / "r", "--heads", "save=save",
                "--pinnerformer", tmp_path / "pf"), f"{tmp_path / 'pf' / 'config.json'}: damaged or truncated")


# ---- 8. order-only data: refused before anything else is asked for -----------------------------------------------

def test_order_only_data_is_refused_before_heads_are_asked_for(cli, tmp_path):
    (tmp_path / "seq.txt").write_text("u1 a b c d\nu2 b c d e\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "seq.txt", "-o", tmp_path / "sq").exit_code == 0
    r = cli("rank", "prepare", "--dataset", tmp_path / "sq", "--output", tmp_path / "r")
    refused(r, "no timestamps (order-only clock)")
    assert "--heads" not in r.stderr


# ---- 9. a read error is not reported as an interrupted write ------------------------------------------------------

def test_a_missing_file_of_a_dataset_is_named_without_talk_of_writing(planted, cli, tmp_path):
    shutil.copytree(planted, tmp_path / "ds")
    (tmp_path / "ds" / "timelines" / "offsets.npy").unlink()
    r = cli("data", "stats", tmp_path / "ds")
    refused(r, "No such file or directory", str(tmp_path / "ds" / "timelines" / "offsets.npy"))
    assert "half-written" not in r.stderr
