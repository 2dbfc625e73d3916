"""CLI surface: --help everywhere, stats numbers, quickstart end to end (text embedding off: fast)."""

import os
import json

import pytest


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "prepare"], ["data", "append"], ["daily"], ["data", "stats"],
                                 ["items"], ["train"],
                                 ["evaluate"], ["experiment"], ["embed"], ["index"], ["retrieve"],
                                 ["simulate-daily"],
                                 ["items", "embed-text"], ["quickstart"], ["rank"], ["rank", "prepare"],
                                 ["rank", "train"], ["rank", "evaluate"], ["rank", "experiment"], ["rank", "score"]])
def test_help_on_every_command(cli, cmd):
    from pinnerformer import __version__

    assert cli("--version").stdout.strip() == __version__
    r = cli(*cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.output
    assert "<bool>" not in r.output  # flags show no metavar; texts are plain (no Rich markup eating "[ray]")
    if cmd == ["embed"]:
        assert "[ray] extra" in " ".join(r.output.split())


def test_quickstart_and_stats(cli, tmp_path):
    r = cli("quickstart", "--workdir", tmp_path / "qs", "--no-text", "--max-epochs", "1")
    assert r.exit_code == 0, r.output
    assert "104,519" in r.stdout and "fingerprint" in r.stdout
    summary = json.loads((tmp_path / "qs" / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == 0 and summary["steps"] > 0
    # the production path: a snapshot as of the last day of data, an HNSW index, top-10 for three users
    snap = json.loads((tmp_path / "qs" / "snapshots" / "2018-09-24" / "manifest.json").read_text())
    assert snap["users"] == 610 and snap["recomputed"] == 610
    assert json.loads((tmp_path / "qs" / "index" / "manifest.json").read_text())["items"] == 9_742
    assert r.stdout.count("top 10 for user") == 3 and "(1995)" in r.stdout  # titles are shown
    # the ranker: day requests with save / like / hide heads, HIT@3 on the test period, one request ranked
    rank = json.loads((tmp_path / "qs" / "rank-data" / "manifest.json").read_text())
    assert [h["name"] for h in rank["options"]["heads"]] == ["save", "like", "hide"]
    # the feature's model saw only the feature period: never the ranker's training, validation or test requests
    assert rank["pinnerformer"]["trained_until"] == rank["feature_end"] < rank["train_end"]
    assert "hit@3/save" in r.stderr and "ranked; what they did" in r.stdout and "utility" in r.stdout
    r = cli("data", "stats", tmp_path / "qs" / "dataset", "--json")
    assert r.exit_code == 0
    s = json.loads(r.stdout)
    assert (s["users"], s["items"], s["events"]) == (610, 9_742, 104_519)
    assert s["events_per_action"]["tag"] == 3_683 and s["positive_actions"] == ["love", "like"]
    assert s["positives_share"] == pytest.approx((13_211 + 35_369) / 104_519)
    assert s["events_per_user"]["min"] == 20 and s["events_per_user"]["max"] == 3_615
    assert s["time_range"].startswith("1996-03-29")
    # running it again replaces the dataset with an identical one
    r = cli("quickstart", "--workdir", tmp_path / "qs", "--no-text", "--no-train")
    assert r.exit_code == 0 and json.loads(cli("data", "stats", tmp_path / "qs" / "dataset", "--json").stdout)[
        "fingerprint"] == s["fingerprint"]


def test_embed_text_on_dataset_without_text(cli, tmp_path):
    (tmp_path / "s.txt").write_text("1 5 6\n2 7 5\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "d").exit_code == 0
    r = cli("items", "embed-text", tmp_path / "d")
    assert r.exit_code == 2 and "no item has text" in r.stderr


def test_a_second_quickstart_keeps_the_first_and_outputs_are_never_overwritten_silently(cli, tmp_path):
    """A newcomer lost a run directory (and what they had added to it) by running the quickstart again; evaluate and
    index replaced earlier outputs without a word."""
    args = ["quickstart", "--workdir", tmp_path / "qs", "--no-text", "--max-epochs", "1", "--no-rank"]
    assert cli(*args).exit_code == 0
    (tmp_path / "qs" / "run" / "my-notes.txt").write_text("keep me")
    r = cli(*args)
    assert r.exit_code == 0 and "moved to" in r.stderr
    (old,) = (tmp_path / "qs" / "previous").iterdir()
    assert (old / "run" / "my-notes.txt").read_text() == "keep me" and (old / "snapshots").is_dir()
    assert (tmp_path / "qs" / "run" / "summary.json").exists()
    run, ds = tmp_path / "qs" / "run", tmp_path / "qs" / "dataset"
    r = cli("index", "-r", run, "-d", ds, "-o", tmp_path / "qs" / "index")
    assert r.exit_code == 2 and "already holds an item index: use --overwrite" in r.stderr
    assert cli("index", "-r", run, "-d", ds, "-o", tmp_path / "qs" / "index", "--overwrite").exit_code == 0
    for _ in range(2):
        assert cli("evaluate", "-r", run, "-d", ds, "--protocol", "leave-one-out").exit_code == 0
    archived = list((run / "eval" / "archive").iterdir())
    assert len(archived) == 2 and {p.suffix for p in archived} == {".json", ".md"}


def test_threads_sets_the_compute_threads_and_refuses_zero(planted, cli, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # put back after the test
    before = torch.get_num_threads()
    try:
        r = cli("--threads", "1", "data", "stats", planted, "--json")
        assert r.exit_code == 0 and torch.get_num_threads() == 1, r.output
    finally:
        torch.set_num_threads(before)
    r = cli("--threads", "0", "data", "stats", planted)
    assert r.exit_code == 2 and "--threads" in r.output
