"""`pinnerformer evaluate`: protocols, baselines, reports, and the errors it must give."""

import json

import numpy as np
import pytest

from conftest import TINY
from pinnerformer.data.synthetic import planted_interest_log


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cli=None):
    from conftest import run_cli

    d = tmp_path_factory.mktemp("evalrun")
    # users' 40-hour timelines all start within 2 days, so a single cut-off finds many of them mid-timeline
    planted_interest_log(n_users=300, events_per_user=40, start_spread_s=2 * 86400).write_csv(d / "log.csv")
    assert run_cli("data", "prepare", "-f", "events", "-i", d / "log.csv", "-o", d / "ds", "--action-col", "action",
                   "--positive", "click").exit_code == 0
    cfg = json.loads(json.dumps(TINY))
    cfg["eval"]["test_fraction"] = 0.3
    (d / "cfg.json").write_text(json.dumps(cfg))
    r = run_cli("train", "-d", d / "ds", "-o", d / "run", "--config", d / "cfg.json", "--no-progress")
    assert r.exit_code == 0, r.output
    return d


def test_future_window_report(trained, cli):
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds")
    assert r.exit_code == 0, r.output
    assert "default cut-off" in r.stderr and "test users eligible" in r.stderr
    rep = json.loads((trained / "run" / "eval" / "future-window-test.json").read_text())
    md = (trained / "run" / "eval" / "future-window-test.md").read_text()
    assert rep["fingerprint"] in md and rep["user_windows"] > 20
    # scored: the test users eligible at the cut-off (an action before it, a click in the 14 days after), no others
    import polars as pl

    from pinnerformer.evaluation.report import users_sha256

    t = int(__import__("datetime").datetime.strptime(rep["cutoffs"][0], "%Y-%m-%d").replace(
        tzinfo=__import__("datetime").timezone.utc).timestamp())
    test = set(np.flatnonzero((pl.read_parquet(trained / "run" / "split.parquet")["split"] == "test").to_numpy()))
    ev = pl.read_parquet(trained / "ds" / "events.parquet")
    before = set(ev.filter(pl.col("ts") < t)["user"].to_list())
    after = set(ev.filter((pl.col("ts") >= t) & (pl.col("ts") < t + 14 * 86400) & (pl.col("action") == 0))[
        "user"].to_list())
    assert rep["users_sha256"] == users_sha256(sorted(test & before & after))
    ours, pop = rep["results"]["pinnerformer"], rep["results"]["most-popular"]
    assert ours["recall@10"]["mean"] > 2 * pop["recall@10"]["mean"]  # planted groups: popularity cannot know them
    lo, hi = ours["recall@10"]["ci95"]
    assert lo <= ours["recall@10"]["mean"] <= hi
    assert f"| pinnerformer | {ours['recall@10']['mean']:.4f} [{lo:.4f}, {hi:.4f}]" in md
    assert 0 < ours["p90-coverage@10"]["mean"] <= 1 and "interest-entropy@50" not in ours  # no interests here
    assert rep["index"] == "whole catalogue (200 items)"
    # the progress bar (on by default) counts every row of every scorer, once
    n = rep["user_windows"] * len(rep["results"])
    assert f"scoring test users ({len(rep['results'])} scorers)" in r.stderr and f"{n}/{n}" in r.stderr
    # two cut-offs pooled: at least as many user-windows as either alone
    r2 = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--cutoff", "2020-09-14,2020-09-15",
             "--index-size", "50", "--no-progress")
    assert r2.exit_code == 0, r2.output
    assert "scoring test users" not in r2.stderr
    rep2 = json.loads((trained / "run" / "eval" / "future-window-test.json").read_text())
    assert rep2["cutoffs"] == ["2020-09-14", "2020-09-15"] and rep2["index"].startswith("random pool of 50")


def test_evaluate_errors(trained, cli, tmp_path):
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--cutoff", "1999-01-01")
    assert r.exit_code == 2 and "outside the data's time range" in r.stderr
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--cutoff", "2020-10-20")
    assert r.exit_code == 2 and "outside the data's time range" in r.stderr
    # a one-second label window: nobody has a positive in it
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--cutoff", "2020-09-15",
            "--label-days", "0.00001")
    assert r.exit_code == 2 and "no test user is eligible" in r.stderr
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--label-days", "0")
    assert r.exit_code == 2 and "label_days: Input should be greater than 0" in r.stderr
    planted_interest_log(n_users=50, seed=3).write_csv(tmp_path / "o.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "o.csv", "-o", tmp_path / "other",
               "--action-col", "action", "--positive", "click").exit_code == 0
    r = cli("evaluate", "--run", trained / "run", "--dataset", tmp_path / "other")
    assert r.exit_code == 2 and "trained on a different dataset" in r.stderr
    (tmp_path / "s.txt").write_text("1 5 6 7\n2 7 5 6\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "seq").exit_code == 0
    r = cli("evaluate", "--run", trained / "run", "--dataset", tmp_path / "seq", "--protocol", "future-window")
    assert r.exit_code == 2 and "different dataset" in r.stderr  # the fingerprint check comes first


def test_leave_one_out_report(trained, cli):
    import polars as pl

    from pinnerformer.evaluation.report import users_sha256

    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--protocol", "leave-one-out")
    assert r.exit_code == 0, r.output
    rep = json.loads((trained / "run" / "eval" / "leave-one-out-test.json").read_text())
    # a run trained on some users (future-window) is scored on its held-out test users only, never on its own
    test_users = np.flatnonzero((pl.read_parquet(trained / "run" / "split.parquet")["split"] == "test").to_numpy())
    assert rep["user_windows"] == rep["distinct_users"] == len(test_users) > 50
    assert rep["users_sha256"] == users_sha256(test_users)
    res = rep["results"]["pinnerformer"]
    assert set(res) == {"hr@10", "ndcg@10", "p90-coverage@10"}
    assert res["ndcg@10"]["mean"] <= res["hr@10"]["mean"]


def test_future_window_refused_on_order_only_data(cli, tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join([str(u)] + [str(int(x)) for x in rng.integers(0, 30, 8)]) for u in range(64)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "seq").exit_code == 0
    cfg = json.loads(json.dumps(TINY))
    cfg["optim"].update(max_epochs=1, batch_size=16)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = cli("train", "-d", tmp_path / "seq", "-o", tmp_path / "run", "--config", tmp_path / "cfg.json", "--no-progress")
    assert r.exit_code == 0, r.output
    r = cli("evaluate", "--run", tmp_path / "run", "--dataset", tmp_path / "seq", "--protocol", "future-window")
    assert r.exit_code == 2 and "is order-only: the future-window protocol needs real timestamps" in r.stderr
    r = cli("evaluate", "--run", tmp_path / "run", "--dataset", tmp_path / "seq")
    assert r.exit_code == 0 and "leave-one-out" in r.stdout


def test_inference_frequency(trained, cli):
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--frequency", "once,daily,realtime")
    assert r.exit_code == 0, r.output
    rep = json.loads((trained / "run" / "eval" / "future-window-test.json").read_text())
    fr = rep["inference_frequency"]
    assert fr["metric"] == "recall@10"
    fr, drop = fr["results"], fr["realtime_to_daily_drop"]
    # "once" is the cut-off embedding for every label: exactly the main recall@10
    assert fr["once"]["mean"] == pytest.approx(rep["results"]["pinnerformer"]["recall@10"]["mean"])
    rt, dl = fr["realtime"]["mean"], fr["daily"]["mean"]
    assert drop == pytest.approx((dl - rt) / rt)
    # users switch interest group mid-timeline: seeing every action before a label helps
    assert rt > fr["once"]["mean"]
    assert "Realtime → daily:" in (trained / "run" / "eval" / "future-window-test.md").read_text()
    r = cli("evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--frequency", "hourly")
    assert r.exit_code == 2 and "unknown frequency 'hourly' (expected one of: once, daily, realtime)" in r.stderr


def test_label_occurrences_and_realtime_inputs(trained):
    from pinnerformer.data import Dataset
    from pinnerformer.evaluation.frequency import label_occurrences
    from pinnerformer.evaluation.tasks import eligible_windows, future_window_task

    ds = Dataset.open(trained / "ds")
    tl = ds.timelines
    t = 1_600_000_000 + 86400
    task = future_window_task(ds, np.arange(40), 14, "future-window/test", cutoffs=[t])
    occ = label_occurrences(ds, task, 14)
    for e, labels, idx in zip(task.ends, task.labels, occ):
        assert (np.asarray(tl.ts[idx]) >= t).all() and (idx >= e).all()
        assert np.array_equal(np.asarray(tl.item[idx]), labels)  # each index is that label's event
        for lab, j in zip(labels, idx):  # ... and its first positive occurrence in the window
            earlier = np.asarray(tl.item[e:j])[np.asarray(tl.action[e:j]) == 0]
            assert lab not in earlier
    assert sum(w is not None for w in eligible_windows(ds, np.arange(40), t, 14)) == len(task)


def test_exclude_history_removes_the_users_own_items_from_the_ranking():
    import torch

    from pinnerformer.data.timelines import Timelines
    from pinnerformer.evaluation.scorer import Scorer, rank_task
    from pinnerformer.evaluation.tasks import EvalTask

    tl = Timelines(offsets=np.array([0, 3, 5]), item=np.array([0, 1, 2, 3, 4], np.int32),
                   action=np.zeros(5, np.int16), ts=np.arange(5, dtype=np.int64), surface=np.full(5, -1, np.int16),
                   duration=np.full(5, np.nan, np.float32), clock="order")
    # user 0's input is items 0, 1 (item 2 is after the cut), label 5; user 1's input is item 3, its label too
    task = EvalTask("t", np.array([0, 1]), np.array([0, 3]), np.array([2, 4]), [np.array([5]), np.array([3])])
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.7, 0.0, 0.0],
                           [0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.0]], dtype=torch.float64)
    kept = rank_task(task, Scorer("fixed", None, None, fixed=scores))
    gone = rank_task(task, Scorer("fixed", None, None, fixed=scores), history=tl)
    assert [r.tolist() for r in kept.ranks] == [[2], [0]] and kept.labels_in_history == 0
    # user 0: the two history items above the label are gone; user 1: the label is a history item, a miss at the end
    assert [r.tolist() for r in gone.ranks] == [[0], [7]] and gone.labels_in_history == 1


def test_leave_one_out_with_history_excluded(trained, cli):
    import polars as pl

    args = ["evaluate", "--run", trained / "run", "--dataset", trained / "ds", "--protocol", "leave-one-out"]
    assert cli(*args).exit_code == 0
    r = cli(*args, "--exclude-history")
    assert r.exit_code == 0, r.output
    kept = json.loads((trained / "run" / "eval" / "leave-one-out-test.json").read_text())
    gone = json.loads((trained / "run" / "eval" / "leave-one-out-test-history-excluded.json").read_text())
    assert not kept["history_excluded"] and gone["history_excluded"]
    assert "history excluded: yes" in r.stdout and "history excluded: no" not in r.stdout
    # counted independently: users whose last item is among their earlier items
    ev = pl.read_parquet(trained / "ds" / "events.parquet")
    test = set(np.flatnonzero((pl.read_parquet(trained / "run" / "split.parquet")["split"] == "test").to_numpy()))
    per_user = ev.group_by("user").agg("item").filter(pl.col("user").is_in(list(test)))["item"].to_list()
    n_rep = sum(items[-1] in items[:-1] for items in per_user)  # (the run's held-out test users are scored)
    assert gone["labels_in_history"] == n_rep > 0
    # every other label can only move up when items are removed: hits are lost only where the label was history
    for scorer in ("pinnerformer", "most-popular"):
        hr_kept, hr_gone = (x["results"][scorer]["hr@10"]["mean"] for x in (kept, gone))
        assert hr_gone >= hr_kept - n_rep / gone["user_windows"] - 1e-12
    assert gone["results"]["pinnerformer"]["hr@10"]["mean"] != kept["results"]["pinnerformer"]["hr@10"]["mean"]


def test_per_user_cutoffs_when_one_day_leaves_too_few_users(tmp_path, cli):
    """A newcomer's evaluate on the quickstart scored 2 users and printed 0.0000 without a warning: users' activity
    rarely overlaps in time. A single cut-off leaving fewer than 30 users falls back to per-user cut-offs, says so
    in the log and the report; and fewer than 30 scored windows is always a warning."""
    planted_interest_log(n_users=300, start_spread_s=400 * 86400).write_csv(tmp_path / "log.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--positive", "click").exit_code == 0
    cfg = json.loads(json.dumps(TINY))
    cfg["eval"]["test_fraction"] = 0.3
    cfg["optim"]["max_epochs"] = 1
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert cli("train", "-d", tmp_path / "ds", "-o", tmp_path / "run", "--config", tmp_path / "cfg.json",
               "--no-progress").exit_code == 0
    r = cli("evaluate", "--run", tmp_path / "run", "--dataset", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "run" / "eval" / "future-window-test.json").read_text())
    assert rep["per_user_cutoffs"] and rep["cutoffs"] is None and rep["user_windows"] >= 30
    assert "a single cut-off leaves only" in rep["warnings"][0] and "**warning**" in r.stdout
    r = cli("evaluate", "--run", tmp_path / "run", "--dataset", tmp_path / "ds", "--cutoff", "2020-09-20")
    rep = json.loads((tmp_path / "run" / "eval" / "future-window-test.json").read_text())
    assert r.exit_code == 0 and rep["user_windows"] < 30 and "noise" in rep["warnings"][-1]
    assert "warning: only" in " ".join(r.stderr.split())
