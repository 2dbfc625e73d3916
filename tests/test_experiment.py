"""`pinnerformer experiment`: variants per grid, a report whose numbers are evaluate's, reuse on re-run."""

import json
import shutil

import numpy as np
import pytest

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.data.synthetic import planted_interest_log
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.blend import KNN, NETWORK, BlendConfig
from pinnerformer.evaluation.metrics import NDCG
from pinnerformer.evaluation.scorer import Scorer, score_task
from pinnerformer.evaluation.tasks import leave_one_out_task
from pinnerformer.io import portable_path
from pinnerformer.models.item_knn import ItemKNN
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


def test_refit_trains_again_on_the_validation_targets_for_the_epochs_chosen_on_validation(planted, tmp_path, cli):
    """`experiment --refit` (leave-one-out): each variant trained again on every timeline but its last action, for
    its run's best epoch + 1 epochs of the same schedule, never validated, blended with the λ its run chose on
    validation (the network alone beside it); a refit cannot choose a λ nor teach (it would be chosen on targets it
    trained on)."""
    import torch

    from pinnerformer.runs.evaluate import load_teacher
    from pinnerformer.training.retrieval import RetrievalTask

    tiny = {k: v for k, v in TINY.items() if k not in ("loss", "eval")}
    (tmp_path / "cfg.json").write_text(json.dumps(tiny))
    args = ("experiment", "-d", planted, "--grid", "default", "-o", tmp_path / "rep", "--preset", "loo", "--config",
            tmp_path / "cfg.json", "--max-epochs", "2", "--refit", "--no-progress")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "epoch 0: kept (a refit, 1 of" in r.output and "kept the weights of epoch" in r.output
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    first, refit = res["rows"]
    assert (first["variant"], refit["variant"], refit["refit_of"]) == ("pinnerformer", "pinnerformer, refit",
                                                                        "pinnerformer")
    epochs = first["best_epoch"] + 1
    runs = tmp_path / "rep" / "runs"
    saved = json.loads((runs / "pinnerformer-refit" / "config.json").read_text())["config"]
    selection = json.loads((runs / "pinnerformer" / "config.json").read_text())["config"]
    assert saved["eval"]["refit_epochs"] == epochs and saved["data"] == selection["data"]  # the same M and windows
    summary = json.loads((runs / "pinnerformer-refit" / "summary.json").read_text())
    records = [json.loads(x) for x in (runs / "pinnerformer-refit" / "metrics.jsonl").read_text().splitlines()]
    assert summary["stopped_by"] == "refit epochs" and summary["best_epoch"] == epochs - 1 and summary["best"] is None
    assert not [x for x in records if x["kind"] == "validation"]  # nothing validated
    # nor a baseline scored on the targets it trains on (the selection run has one)
    assert not [x for x in records if x["kind"] == "baseline"] and summary["popularity"] is None
    assert json.loads((runs / "pinnerformer" / "summary.json").read_text())["popularity"] is not None
    assert {x["epoch"] for x in records if x["kind"] == "step"} == set(range(epochs))
    # the refit's training part is every timeline but its last action; the selection run's, all but the last two
    ds = Dataset.open(planted)
    lengths = ds.timelines.lengths
    for cfg, drop in ((saved, 1), (selection, 2)):
        task = RetrievalTask(ds, load_config("loo", overrides=cfg))
        assert np.array_equal(task.view.end - task.view.start, np.maximum(lengths - drop, 0))
    assert summary["steps"] == epochs * RetrievalTask(ds, load_config("loo", overrides=saved)).steps_per_epoch
    # best.pt is the moving average of the weights at the end of the last epoch (what a run keeps), never selected
    best, last = (torch.load(runs / "pinnerformer-refit" / "checkpoints" / f"{n}.pt", weights_only=False)
                  for n in ("best", "last"))
    assert len(last["ema"]) > 0
    ema = dict(zip([n for n, _ in RetrievalTask(ds, load_config("loo", overrides=saved)).model.named_parameters()],
                   last["ema"]))
    assert all(torch.equal(best["model"][n], e) for n, e in ema.items())
    # it learned the validation targets it was shown: validation (not held out any more) is above the selection run's
    val = {}
    for run in ("pinnerformer", "pinnerformer-refit"):
        r = cli("evaluate", "-r", runs / run, "-d", planted, "--split", "validation", "--exclude-history",
                "--no-item-knn", "--no-progress")
        assert r.exit_code == 0, r.output
        val[run] = json.loads((runs / run / "eval" / "leave-one-out-validation-history-excluded.json").read_text())
    nd = {k: v["results"]["pinnerformer"]["ndcg@10"]["mean"] for k, v in val.items()}
    assert nd["pinnerformer-refit"] > nd["pinnerformer"]
    # the report: the refit blended with the λ the selection run chose on validation (no validation number of its
    # own), the network alone beside it, said not to be like for like
    md = (tmp_path / "rep" / "report.md").read_text()
    ex = refit["history_removed"]["results"]
    assert list(ex) == ["pinnerformer", NETWORK, KNN, "most-popular"] and refit["validation"] == {}
    for rep in ("report", "history_removed"):  # each protocol's λ, chosen on validation under it
        carried, chosen = refit[rep]["blend"], first[rep]["blend"]
        assert chosen["history_excluded"] is (rep == "history_removed")
        where = ", history removed" if rep == "history_removed" else ""
        assert (f"- pinnerformer{where}: the model is the network blended with item-to-item neighbours "
                f"(`evaluation.blend`): λ = {chosen['weight']:g}, chosen on validation ndcg@10 (history "
                f"{'removed' if chosen['history_excluded'] else 'in'}; by λ") in md
        assert carried["chosen_by"] == portable_path(first["run"]) and chosen["chosen_by"] is None
        assert {k: v for k, v in carried.items() if k != "chosen_by"} == {k: v for k, v in chosen.items()
                                                                           if k != "chosen_by"}
    # the validation column: the numbers of the protocol the checkpoint was selected under (history removed), the
    # blend's at the λ chosen under that protocol, in that protocol's row only
    chosen = first["history_removed"]["blend"]
    assert first["selected_history_removed"] is True
    assert first["validation"]["ndcg@10 blended"] == chosen["validation"][f"{chosen['weight']:g}"]
    row = next(x for x in md.splitlines() if x.startswith("| pinnerformer, history removed |"))
    assert row.endswith(f"| {first['best_epoch']} | ndcg@10 {first['validation']['ndcg@10']:.4f}, ndcg@10 blended "
                        f"{first['validation']['ndcg@10 blended']:.4f} |")
    assert next(x for x in md.splitlines() if x.startswith("| pinnerformer |")).endswith(
        f"| {first['best_epoch']} | |")
    assert f"| pinnerformer, refit, history removed | {ex['pinnerformer']['hr@10']['mean']:.4f} [" in md
    assert f"| pinnerformer, refit: network alone, history removed | {ex[NETWORK]['hr@10']['mean']:.4f} [" in md
    assert f"| pinnerformer, refit: neighbours alone, history removed | {ex[KNN]['hr@10']['mean']:.4f} [" in md
    assert f"for {epochs} epoch(s), the number pinnerformer chose on validation" in md and "not like for like" in md
    assert f"chosen on validation ndcg@10 by `{portable_path(first['run'])}`, the run this refit repeats" in md
    assert f"| {epochs - 1} (the last: a refit) |" in md
    # the refit's neighbours are fit on its own training part (every timeline but the last action), by hand
    cfg = BlendConfig().knn
    task = leave_one_out_task(ds, "test")
    for drop, same in ((1, True), (2, False)):
        knn = ItemKNN.fit(ds.timelines.drop_last(drop), ds.manifest.n_items, ds.manifest.positive_codes, cfg)
        res, _ = score_task(task, Scorer(KNN, None, None, rows_fn=lambda rows: knn.scores(
            ds.timelines, task.starts[rows], task.ends[rows])), 10, [NDCG], None, None, ds.timelines, intervals=False)
        assert (res["ndcg@10"].mean == pytest.approx(ex[KNN]["ndcg@10"]["mean"], abs=1e-6)) is same
    # the network alone is what scoring the refit without a blend gives; `evaluate --blend-from` the report's blend
    r = cli("evaluate", "-r", runs / "pinnerformer-refit", "-d", planted, "--exclude-history", "--no-item-knn",
            "--no-progress")
    assert r.exit_code == 0, r.output
    alone = json.loads((runs / "pinnerformer-refit" / "eval" / "leave-one-out-test-history-excluded.json").read_text())
    assert alone["results"]["pinnerformer"] == ex[NETWORK] and alone["blend"] is None
    r = cli("evaluate", "-r", runs / "pinnerformer-refit", "-d", planted, "--exclude-history", "--blend-from",
            runs / "pinnerformer", "--no-progress")
    assert r.exit_code == 0, r.output
    again = json.loads((runs / "pinnerformer-refit" / "eval" / "leave-one-out-test-history-excluded.json").read_text())
    assert again["results"] == ex and again["blend"] == refit["history_removed"]["blend"]
    # --blend-from refuses: a run that is not a refit; a refit as the run repeated; another configuration (what a
    # resume may change, the machine or the patience, may differ); another epoch count; another dataset; an
    # unfinished run on either side; a contradiction
    def altered(name, change, src=runs / "pinnerformer"):
        shutil.copytree(src, tmp_path / name)
        saved_other = json.loads((tmp_path / name / "config.json").read_text())
        change(saved_other)
        (tmp_path / name / "config.json").write_text(json.dumps(saved_other))
        return tmp_path / name

    seed7 = altered("seed7", lambda c: c["config"].update(seed=7))
    patient = altered("patient", lambda c: c["config"]["optim"].update(patience=9))
    other_data = altered("other-data", lambda c: c["dataset"].update(fingerprint="0" * 16))
    unfinished, later = (altered(n, lambda c: None) for n in ("unfinished", "later"))
    (unfinished / "summary.json").unlink()
    summary_later = json.loads((later / "summary.json").read_text())
    (later / "summary.json").write_text(json.dumps({**summary_later, "best_epoch": summary_later["best_epoch"] + 1}))
    refit_unfinished = altered("refit-unfinished", lambda c: None, src=runs / "pinnerformer-refit")
    (refit_unfinished / "summary.json").unlink()
    r = cli("evaluate", "-r", runs / "pinnerformer-refit", "-d", planted, "--blend-from", patient, "--no-progress")
    assert r.exit_code == 0, r.output
    for run, src, flag, msg in (
            (runs / "pinnerformer", runs / "pinnerformer", (), "is not a refit (eval.refit_epochs); its blend's λ"),
            (runs / "pinnerformer-refit", runs / "pinnerformer-refit", (), "that is not a refit itself"),
            (runs / "pinnerformer-refit", seed7, (), "their configurations differ: seed 7 (the refit: 0)"),
            (runs / "pinnerformer-refit", later, (), f"chose epoch {epochs} on validation, but the refit trained for "),
            (runs / "pinnerformer-refit", other_data, (), "was trained on dataset 0000000000000000, not on"),
            (runs / "pinnerformer-refit", unfinished, (), "has not finished training (no summary.json): its best"),
            (refit_unfinished, runs / "pinnerformer", (), "has not finished training (no summary.json): resume it"),
            (runs / "pinnerformer-refit", runs / "pinnerformer", ("--no-item-knn",), "contradicts --no-item-knn")):
        r = cli("evaluate", "-r", run, "-d", planted, "--blend-from", src, *flag, "--no-progress")
        assert r.exit_code == 2 and msg in r.stderr, r.stderr
    # run again: both runs reused, the same numbers
    again = cli(*args)
    assert again.exit_code == 0 and again.output.count("finished earlier: reusing its checkpoint") == 2
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["rows"][1]["report"]["results"] == \
        refit["report"]["results"]
    # a refit never chooses a λ nor teaches; --refit needs the leave-one-out protocol
    r = cli("evaluate", "-r", runs / "pinnerformer-refit", "-d", planted, "--item-knn", "--no-progress")
    assert r.exit_code == 2 and "is a refit (eval.refit_epochs): it trained on the validation targets" in r.stderr
    assert "--blend-from RUN" in r.stderr
    with pytest.raises(PinnerformerError, match="trained under a refit .* a teacher must be a leave-one-out run"):
        load_teacher(runs / "pinnerformer-refit", ds)
    r = cli("experiment", "-d", planted, "--grid", "default", "-o", tmp_path / "fw", "--refit", "--no-progress")
    assert r.exit_code == 2 and "--refit trains again on the validation targets" in r.stderr
    assert not (tmp_path / "fw" / "runs").exists()
    with pytest.raises(PinnerformerError, match="eval.refit_epochs 3 is more than optim.max_epochs 2"):
        RetrievalTask(ds, load_config("loo", overrides={**saved, "eval": {**saved["eval"], "refit_epochs": 3}}))
