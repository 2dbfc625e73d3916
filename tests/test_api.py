"""The Python API (`import pinnerformer as pf`, pinnerformer/api.py): the public names are exactly the documented
ones (a name added, removed or renamed fails here until `__all__` and docs/api.md say so), each resolves, configs
given as dicts are checked like the command line's, and the worked example (examples/api_tour.py) runs end to end
and prints what it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pinnerformer as pf
from pinnerformer import api

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [
    "__version__",
    "Dataset", "RankData", "ItemIndex", "Snapshot", "TrainConfig", "RankTrainConfig", "TrainSummary",
    "EvaluationReport", "RankingReport", "SnapshotManifest", "RankManifest", "BatchTopK", "PinnerformerError",
    "open_dataset", "builtin_dataset", "prepare_dataset", "train", "evaluate", "embed_day", "build_index",
    "open_index", "recommend", "recommend_all", "similar_items", "prepare_requests", "open_requests", "train_ranker",
    "evaluate_rankers", "score", "create_app",
]


def test_the_public_names_are_the_documented_ones_and_each_resolves():
    assert pf.__all__ == PUBLIC
    assert api.__all__ == [n for n in PUBLIC if n != "__version__"]
    for name in PUBLIC:
        assert getattr(pf, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        pf.trian  # noqa: B018
    documented = set(re.findall(r"^### `pf\.(\w+)", (ROOT / "docs" / "api.md").read_text(), re.M))
    functions = {n for n in api.__all__ if callable(getattr(pf, n)) and getattr(pf, n).__module__ == "pinnerformer.api"}
    assert functions and documented == functions, (functions - documented, documented - functions)
    for n in functions:
        assert getattr(pf, n).__doc__ or n in ("open_index", "open_requests", "similar_items"), n


def test_configs_given_as_dicts_are_checked_like_the_command_lines():
    cfg = api._rank_config("fast", "none", {"optim": {"lr": 3e-4}})
    assert cfg.model.sequence == "none" and cfg.optim.lr == 3e-4 and cfg.preset == "fast"
    assert api._rank_config("default", "gbdt", None).learner == "gbdt"
    with pytest.raises(pf.PinnerformerError, match="optim.lrr"):
        api._rank_config("default", None, {"optim": {"lrr": 1}})
    with pytest.raises(pf.PinnerformerError, match="unknown preset"):
        api._train_config("huge", None)
    assert api._train_config("small", {"optim": {"max_epochs": 3}}).optim.max_epochs == 3


def test_bad_paths_raise_the_librarys_error_not_a_traceback_from_deep_inside(tmp_path):
    with pytest.raises(pf.PinnerformerError):
        pf.open_dataset(tmp_path / "nowhere")
    with pytest.raises(pf.PinnerformerError, match="reference 'b' is not one of the runs"):
        pf.evaluate_rankers({"a": tmp_path}, reference="b")


def test_the_worked_example_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "api_tour.py"), str(tmp_path / "tour")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"^610 users, 9742 items, 104519 events$", text, re.M)
    assert re.search(r"recall@10: model 0\.\d{4}, most popular 0\.\d{4}", text)
    for name in ("random", "popularity", "ranker", "trees"):
        assert re.search(rf"^ *{name}  HIT@3/save \d\.\d{{3}} \[\d\.\d{{3}}, \d\.\d{{3}}\]$", text, re.M), name
    assert "utility" in text and "item_id" in text  # the scored request and the recommendations printed
    assert re.search(r"^top-10 of 610 users: 6100 rows in top10\.parquet$", text, re.M)


def test_reports_name_paths_portably(tmp_path, monkeypatch):
    from pinnerformer.io import portable_path

    inside = tmp_path / "repo" / "docs" / "results" / "run"
    inside.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert portable_path(inside) == "docs/results/run"
    assert portable_path(tmp_path / "elsewhere" / "ml1m") == "ml1m"  # outside: its name, never the machine's path
    assert portable_path(tmp_path / "repo") == "."


ABSOLUTE = re.compile(r"(?<![\w$.])/(?:tmp|work|home|root|Users|mnt|var/folders)/")


def test_committed_docs_and_results_hold_no_absolute_paths_of_the_machine_that_made_them():
    tracked = subprocess.run(["git", "ls-files", "README.md", "docs", "examples"], cwd=ROOT, capture_output=True,
                             text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the committed files cannot be listed")
    bad = []
    for name in tracked.stdout.split():
        if not name.endswith((".md", ".json", ".log", ".py", ".txt")):
            continue
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if ABSOLUTE.search(line):
                bad.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not bad, "absolute paths in committed files:\n" + "\n".join(bad[:20])


def test_prepare_dataset_names_the_bad_line_and_skip_invalid_counts_it(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text("user,item,timestamp,action\nu1,i1,1600000000,click\nu1,i2,not-a-time,click\n"
                   "u2,i1,1600000100,save\nu2,i3,1600000200,click\n")
    with pytest.raises(pf.PinnerformerError, match=r"line 3"):
        pf.prepare_dataset(src, tmp_path / "ds", format="events", columns={"action": "action"}, positive=["click"])
    assert not (tmp_path / "ds" / "manifest.json").exists()
    ds = pf.prepare_dataset(src, tmp_path / "ds", format="events", columns={"action": "action"},
                            positive=["click"], skip_invalid=True)
    assert isinstance(ds, pf.Dataset)
    assert (ds.manifest.n_events, ds.manifest.n_users, ds.manifest.n_items) == (3, 2, 2)  # i2 was on the bad line
    assert sum(ds.manifest.skipped.values()) == 1
    assert pf.open_dataset(tmp_path / "ds").manifest.fingerprint == ds.manifest.fingerprint
