"""`pinnerformer experiment`: variants per grid, a report whose numbers are evaluate's, reuse on re-run."""

import json

import numpy as np
import pytest

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.data.synthetic import planted_interest_log
from pinnerformer.errors import PinnerformerError
from pinnerformer.runs.experiment import variants
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import fitted_max_len


def test_grids_list_the_papers_variants(planted, tmp_path, cli):
    ds = Dataset.open(planted)  # no content vectors, no duration/surface, two action types
    assert [n for n, _ in variants("objectives", ds)] == ["next-action", "sasrec", "all-action", "dense-all-action"]
    assert [n for n, _ in variants("negatives", ds)] == ["in-batch + logQ", "in-batch", "random + logQ", "random",
                                                        "mixed + logQ", "mixed"]
    assert [n for n, _ in variants("features", ds)] == ["all features", "− time", "− action type", "− position"]
    (tmp_path / "s.txt").write_text("1 5 6 7\n2 7 5 6\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "seq").exit_code == 0
    assert [n for n, _ in variants("features", Dataset.open(tmp_path / "seq"))] == ["all features", "− position"]
    r = cli("experiment", "-d", tmp_path / "seq", "--grid", "frequency", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "needs real timestamps" in r.stderr
    r = cli("experiment", "-d", planted, "--grid", "colours", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "unknown grid 'colours'" in r.stderr


def test_frequency_experiment_report(tmp_path, cli):
    planted_interest_log(n_users=300, start_spread_s=2 * 86400).write_csv(tmp_path / "log.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds",
               "--action-col", "action", "--positive", "click").exit_code == 0
    cfg = json.loads(json.dumps(TINY))
    cfg["eval"]["test_fraction"] = 0.3
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = ["experiment", "-d", tmp_path / "ds", "--grid", "frequency", "-o", tmp_path / "rep", "--config",
            tmp_path / "cfg.json", "--max-epochs", "2", "--no-progress"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "frequency.png").stat().st_size > 5000
    assert [row["variant"] for row in res["rows"]] == ["dense-all-action", "sasrec"]
    for row in res["rows"]:  # the table shows exactly what evaluate wrote for that run
        ev = json.loads((tmp_path / "rep" / "runs" / row["variant"] / "eval" / "future-window-test.json").read_text())
        rec = ev["results"]["pinnerformer"]["recall@10"]
        assert f"| {row['variant']} | {rec['mean']:.4f} [{rec['ci95'][0]:.4f}, {rec['ci95'][1]:.4f}]" in md
        assert ev["inference_frequency"]["realtime_to_daily_drop"] is not None
    assert res["fingerprint"] in md and f"reproduce: `pinnerformer experiment -d {tmp_path / 'ds'} --grid frequency" in md
    # running it again reuses the finished runs and reproduces the same numbers
    r = cli(*args)
    assert r.exit_code == 0 and "finished earlier: reusing its checkpoint" in r.stderr
    again = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [x["report"]["results"] for x in again["rows"]] == [x["report"]["results"] for x in res["rows"]]
    r = cli(*args[:-3], "--max-epochs", "3", "--no-progress")
    assert r.exit_code == 2 and "was made with another configuration" in r.stderr
    # pooled cut-offs: the same runs re-scored; every (user, cut-off) window counts once, and the report says so
    cuts = "2020-09-14,2020-09-15"
    r = cli(*args, "--cutoff", cuts)
    assert r.exit_code == 0, r.output
    pooled = json.loads((tmp_path / "rep" / "results.json").read_text())
    ev = pooled["rows"][0]["report"]
    assert ev["cutoffs"] == cuts.split(",") and f"--cutoff {cuts}" in (tmp_path / "rep" / "report.md").read_text()
    assert ev["user_windows"] > res["rows"][0]["report"]["user_windows"]  # two cut-offs pooled: more windows
    r = cli(*args, "--cutoff", "1999-01-01")
    assert r.exit_code == 2 and "outside the data's time range" in r.stderr


def test_default_grid_leave_one_out_report(planted, tmp_path, cli):
    tiny = {k: v for k, v in TINY.items() if k not in ("loss", "eval")}
    (tmp_path / "cfg.json").write_text(json.dumps(tiny))
    r = cli("experiment", "-d", planted, "--grid", "default", "-o", tmp_path / "rep", "--preset", "loo",
            "--config", tmp_path / "cfg.json", "--max-epochs", "2", "--no-progress")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    md = (tmp_path / "rep" / "report.md").read_text()
    assert res["protocol"] == "leave-one-out" and [x["variant"] for x in res["rows"]] == ["pinnerformer"]
    ev = json.loads((tmp_path / "rep" / "runs" / "pinnerformer" / "eval" / "leave-one-out-test.json").read_text())
    assert ev["user_windows"] == 300 and ev["split"] == "test"
    for name, rr in ev["results"].items():  # the model and every baseline, with intervals, in the table
        nd = rr["ndcg@10"]
        label = {"pinnerformer": name, "pinnerformer network alone": "pinnerformer: network alone"}.get(
            name, f"baseline: {name}")
        assert f"| {label} | {rr['hr@10']['mean']:.4f} [" in md and f"{nd['mean']:.4f} [{nd['ci95'][0]:.4f}" in md
    val = res["rows"][0]["validation"]["ndcg@10"]
    assert f"ndcg@10 {val:.4f}" in md and "--preset loo" in md and res["machine"] in md
    # the literature's protocol beside it: the same model with each user's input items removed from the ranking
    ex = json.loads((tmp_path / "rep" / "runs" / "pinnerformer" / "eval" /
                     "leave-one-out-test-history-excluded.json").read_text())
    assert ex["history_excluded"] and res["rows"][0]["history_removed"]["results"] == ex["results"]
    nd = ex["results"]["pinnerformer"]["ndcg@10"]
    assert f"| pinnerformer, history removed | {ex['results']['pinnerformer']['hr@10']['mean']:.4f} [" in md
    assert f"{nd['mean']:.4f} [{nd['ci95'][0]:.4f}" in md and "baseline: most-popular, history removed" in md
    assert (tmp_path / "rep" / "default.png").stat().st_size > 5000


def test_max_len_fitted_to_the_data_is_saved_and_a_rerun_reuses_the_run(planted, tmp_path, cli):
    """data.max_len_cap: M is the 90th percentile of the timeline lengths, clipped to [max_len, cap]; the run saves
    the fitted M, and the same experiment run again compares equal to it (reuses the run, no config error)."""
    ds = Dataset.open(planted)
    q90 = int(np.ceil(np.quantile(ds.timelines.lengths - 2, 0.9)))  # leave-one-out trains on all but the last two
    assert 8 < q90 < 64
    fit = lambda over: fitted_max_len(load_config("loo", overrides={"data": over}), ds).data.max_len  # noqa: E731
    assert fit({"max_len": 8, "max_len_cap": 64}) == q90  # between the floor and the cap: the data's own
    assert fit({"max_len": 8, "max_len_cap": 9}) == 9  # the cap bounds it
    assert fit({"max_len": q90 + 5, "max_len_cap": 500}) == q90 + 5  # the floor bounds it
    assert fit({"max_len": 8, "max_len_cap": None}) == 8  # no cap: max_len as given
    once = fitted_max_len(load_config("loo", overrides={"data": {"max_len": 8, "max_len_cap": 64}}), ds)
    assert fitted_max_len(once, ds) == once  # idempotent: a saved run's config is its own fit
    with pytest.raises(PinnerformerError, match="max_len_cap 8 is below max_len 16"):
        load_config("loo", overrides={"data": {"max_len": 16, "max_len_cap": 8}})

    tiny = {k: v for k, v in TINY.items() if k not in ("loss", "eval")}
    (tmp_path / "cfg.json").write_text(json.dumps({**tiny, "data": {**tiny["data"], "max_len": 8,
                                                                     "max_len_cap": 64}}))
    args = ("experiment", "-d", planted, "--grid", "default", "-o", tmp_path / "rep", "--preset", "loo",
            "--config", tmp_path / "cfg.json", "--max-epochs", "1", "--no-progress")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "rep" / "runs" / "pinnerformer" / "config.json").read_text())["config"]
    assert saved["data"]["max_len"] == q90 and saved["data"]["max_len_cap"] == 64
    assert f"M = {q90} (the 90% quantile of the training timelines' lengths is {q90}; the cap is 64)" in r.output
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "finished earlier: reusing its checkpoint" in again.output
    # the config file the run was made with resumes it (compared after the same fit), with a longer budget
    r = cli("train", "-d", planted, "-o", tmp_path / "rep" / "runs" / "pinnerformer", "--preset", "loo",
            "--config", tmp_path / "cfg.json", "--max-epochs", "2", "--resume", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "resuming with optim.max_epochs 1 -> 2" in r.output and "would change it" not in r.output
