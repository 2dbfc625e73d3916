"""`pinnerformer seeds`: one experiment's reports over seeds, with the mean, spread and validation curves."""

import json
import statistics

import pytest

from conftest import TINY, run_cli


def _report(cli, planted, out, seed, epochs=2, lr=None):
    tiny = {k: v for k, v in TINY.items() if k not in ("loss", "eval")}
    if lr is not None:
        tiny = {**tiny, "optim": {**tiny["optim"], "lr": lr}}
    (out.parent / f"{out.name}.json").write_text(json.dumps(tiny))
    r = cli("experiment", "-d", planted, "--grid", "default", "-o", out, "--preset", "loo", "--config",
            out.parent / f"{out.name}.json", "--max-epochs", str(epochs), "--seed", str(seed), "--no-progress")
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_seeds(planted, tmp_path_factory):
    """One experiment (preset loo, 2 epochs) run with seeds 0 and 1: its report folders and their results."""
    d = tmp_path_factory.mktemp("seeds")
    reports = [d / "rep", d / "rep-seed-1"]
    return reports, [_report(run_cli, planted, out, seed) for seed, out in enumerate(reports)]


def test_seeds_gives_each_rows_mean_and_spread_and_every_seeds_validation_curve(two_seeds, tmp_path, cli):
    reports, results = two_seeds  # the end of this test damages seed 1's report (the next test reads only seed 0's)
    r = cli("seeds", *reports, "-o", tmp_path / "seeds")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "seeds" / "results.json").read_text())
    md = (tmp_path / "seeds" / "report.md").read_text()
    assert res["seeds"] == [0, 1] and res["metrics"] == ["ndcg@10", "hr@10"] and res["configs_compared"] == 1
    # every row of the reports, history in and removed, each with the two seeds' test values as the reports have them
    rows = {x["row"]: x for x in res["rows"]}
    assert list(rows)[:2] == ["pinnerformer", "pinnerformer: network alone"]
    assert "baseline: most-popular, history removed" in rows
    for label, key, model in [("pinnerformer", "report", "pinnerformer"),
                              ("pinnerformer: network alone, history removed", "history_removed",
                               "pinnerformer network alone")]:
        values = [x["rows"][0][key]["results"][model]["ndcg@10"]["mean"] for x in results]
        assert rows[label]["per_seed"]["ndcg@10"] == values
        assert rows[label]["mean"]["ndcg@10"] == statistics.fmean(values)
        assert rows[label]["std"]["ndcg@10"] == statistics.stdev(values)
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        assert f"| {label} | {mean:.4f} ± {sd:.4f} | {values[0]:.4f} / " in md
    # the curves: each seed's validation records, epoch by epoch, as its run logged them
    for seed, out in enumerate(reports):
        logged = [json.loads(x) for x in (out / "runs" / "pinnerformer" / "metrics.jsonl").read_text().splitlines()]
        curve = [x["ndcg@10"] for x in logged if x["kind"] == "validation"]
        assert len(curve) == 2 and results[seed]["rows"][0]["curve"] == curve
        kept = next(c for c in res["curves"] if c["seed"] == seed)
        assert kept["values"] == curve and kept["best_epoch"] == results[seed]["rows"][0]["best_epoch"]
        assert f"| pinnerformer | {seed} | {kept['best_epoch']} | " + " ".join(f"{v:.4f}" for v in curve) in md
    assert (tmp_path / "seeds" / "seeds.png").stat().st_size > 5000

    # a report written before results.json kept curves: the run's own log gives the same curve; without the run, a note
    old = json.loads((reports[1] / "results.json").read_text())
    old["rows"][0].pop("curve")
    (reports[1] / "results.json").write_text(json.dumps(old))
    assert cli("seeds", *reports, "-o", tmp_path / "again").exit_code == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text())["curves"] == res["curves"]
    # never the curve of another run in the report's folder: one not finished (or finished elsewhere) is not its run
    (reports[1] / "runs" / "pinnerformer" / "summary.json").unlink()
    r = cli("seeds", *reports, "-o", tmp_path / "again")
    assert r.exit_code == 0 and "is not the one it was made from (unfinished, the report's best epoch" in r.stderr
    assert json.loads((tmp_path / "again" / "results.json").read_text())["curves"][1]["values"] == []
    (reports[1] / "runs" / "pinnerformer" / "metrics.jsonl").unlink()
    r = cli("seeds", *reports, "-o", tmp_path / "again")
    assert r.exit_code == 0 and "the report predates curves and its run is not here" in r.stderr
    assert "(none: the report predates curves and its finished run is not here)" in (
        tmp_path / "again" / "report.md").read_text()


def test_seeds_refuses_reports_that_are_not_one_experiment(two_seeds, planted, tmp_path, cli):
    first = two_seeds[0][0]
    shorter = tmp_path / "rep-1-epoch"
    _report(cli, planted, shorter, 2, epochs=1)
    other = tmp_path / "rep-lr"  # as short, but another learning rate
    _report(cli, planted, other, 3, epochs=1, lr=1e-3)

    def refused(*args):
        r = cli("seeds", *args, "-o", tmp_path / "out")
        assert r.exit_code == 2 and "Traceback" not in r.output
        return r.stderr

    assert "a spread needs two or more" in refused(first)
    assert "each report must have a seed of its own" in refused(first, first)
    assert "max_epochs is 1, the first report's is 2: not the same experiment" in refused(first, shorter)
    assert f"the run {other / 'runs' / 'pinnerformer'} differs from" in refused(shorter, other)
    assert "in optim (beyond the seed)" in refused(shorter, other)
    assert f"{tmp_path / 'nowhere'}: no results.json" in refused(first, tmp_path / "nowhere")
    assert "no metric 'mrr@10' in the reports (they have hr@10, ndcg@10" in refused(shorter, other, "--metrics", "mrr@10")
    fewer = tmp_path / "rep-fewer-rows"  # the second seed's report with one baseline less in every row
    res = json.loads((two_seeds[0][1] / "results.json").read_text())
    for row in res["rows"]:
        for rep in ("report", "history_removed"):
            del row[rep]["results"]["most-popular"]
    fewer.mkdir()
    (fewer / "results.json").write_text(json.dumps(res))
    msg = refused(first, fewer)
    assert f"{fewer}: rows [" in msg and "the first report's are [" in msg and "'baseline: most-popular'" in msg
    (shorter / "results.json").write_text('{"grid": "default", ')  # cut short
    assert f"{shorter / 'results.json'}: damaged or truncated experiment results" in refused(first, shorter)
    assert not (tmp_path / "out").exists()  # nothing written for a refused summary
