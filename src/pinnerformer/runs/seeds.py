"""`pinnerformer seeds`: one experiment's reports over several seeds, side by side.

`pinnerformer experiment --seed N` writes one report per seed. This reads their results.json, checks that they are
the same experiment on the same data but for the seed (grid, preset, epoch budget, dataset fingerprint, protocol,
variants, and the runs' configurations where the runs are there), and writes OUTPUT/report.md, results.json and
seeds.png: each row's test metrics per seed with their mean and sample standard deviation, and each variant's
validation curve per seed (the selection metric at the end of each epoch), so a reader sees the spread a single
seed hides and how far along the schedule each seed chose its checkpoint.
"""

from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path

from pinnerformer.config import StrictModel, validate
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import atomic_path, portable_path, read_json_record, write_json_atomic, write_text_atomic
from pinnerformer.runs.experiment import ExperimentResult, labelled_results
from pinnerformer.runs.run_dir import RunDir
from pinnerformer.training import run_files as rf

# the settings a configuration differs in by seed: the seed; the teacher (a distilled report's teacher is the ensemble
# of the same seed); a refit's epoch count (the number its seed's run chose on validation)
PER_SEED_FIELDS = {"seed": True, "loss": {"teacher": True}, "eval": {"refit_epochs": True}}


class SeedRow(StrictModel):
    row: str  # the reports' row label, e.g. "pinnerformer: network alone, history removed"
    per_seed: dict[str, list[float]]  # metric -> its test value in each report, in the order of `seeds`
    mean: dict[str, float]
    std: dict[str, float]  # the sample standard deviation over the seeds (n − 1 in the denominator)


class SeedCurve(StrictModel):
    variant: str
    seed: int
    metric: str
    values: list[float]  # on validation at the end of each epoch, epoch 0 first
    best_epoch: int


class SeedsResult(StrictModel):
    reports: list[str]
    seeds: list[int]
    grid: str
    preset: str
    dataset: str
    fingerprint: str
    protocol: str
    metrics: list[str]
    rows: list[SeedRow]
    curves: list[SeedCurve]
    configs_compared: int  # variants whose runs' configurations were compared (the runs stay out of git)
    command: str
    date: str


def _load(report: Path) -> ExperimentResult:
    path = Path(report) / "results.json"
    if not path.exists():
        raise PinnerformerError(f"{report}: no results.json (a report folder written by `pinnerformer experiment`)")
    return validate(ExperimentResult, read_json_record(path, "experiment results"), str(path))


def _curve(row, log) -> list[float]:
    if row.curve or row.refit_of is not None:
        return row.curve
    run = Path(row.run)  # a report written before results.json kept the curve: the run's own log, when it is here
    if not (run / rf.METRICS).exists():
        log(f"note: no validation curve for {row.run}: the report predates curves and its run is not here")
        return []
    run = RunDir(run)
    summary = run.summary()
    if summary is None or summary.best_epoch != row.best_epoch:  # a report is made from a finished run: not this one
        log(f"note: no validation curve for {row.run}: the report predates curves and the run there is not the one "
            f"it was made from ({'unfinished' if summary is None else f'best epoch {summary.best_epoch}'}, the "
            f"report's best epoch {row.best_epoch})")
        return []
    return run.validation_curve(summary.metric)


def _check_same(first: ExperimentResult, other: ExperimentResult, where: str) -> None:
    for field in ("grid", "preset", "max_epochs", "fingerprint", "protocol"):
        a, b = getattr(first, field), getattr(other, field)
        if a != b:
            raise PinnerformerError(f"{where}: {field} is {b!r}, the first report's is {a!r}: not the same experiment")
    names = lambda r: [x.variant for x in r.rows]  # noqa: E731
    if names(first) != names(other):
        raise PinnerformerError(f"{where}: variants {names(other)}, the first report's are {names(first)}")


def _same_configs(results: list[ExperimentResult], reports: list[Path]) -> int:
    """The runs' configurations, but for the per-seed fields, must match across seeds; returns how many variants were
    compared (a variant whose runs are not all here is not)."""
    compared = 0
    for i, row in enumerate(results[0].rows):
        runs = [Path(r.rows[i].run) for r in results]
        if not all((run / rf.CONFIG).exists() for run in runs):
            continue
        configs = [RunDir(run).config.model_dump(exclude=PER_SEED_FIELDS) for run in runs]
        for report, run, config in zip(reports[1:], runs[1:], configs[1:]):
            if config != configs[0]:
                diff = sorted(k for k in config if config[k] != configs[0].get(k))
                raise PinnerformerError(f"{report}: the run {run} differs from {runs[0]} in {', '.join(diff)} (beyond "
                                        "the seed): not the same configuration")
        compared += 1
    return compared


def summarise_seeds(reports: list[Path], output: Path, metrics: list[str] | None = None, command: str = "",
                    log=print) -> SeedsResult:
    if len(reports) < 2:
        raise PinnerformerError(f"seeds: {len(reports)} report(s) given; a spread needs two or more")
    results = [_load(r) for r in reports]
    for report, r in zip(reports[1:], results[1:]):
        _check_same(results[0], r, str(report))
    seeds = [r.seed for r in results]
    if len(set(seeds)) != len(seeds):
        raise PinnerformerError(f"seeds: the reports' seeds are {seeds}; each report must have a seed of its own")
    labelled = [labelled_results(r) + (labelled_results(r, True) if r.rows[0].history_removed else [])
                for r in results]
    available = list(results[0].rows[0].report.model)
    metrics = metrics or [m for p in ("ndcg@", "hr@", "recall@") for m in available if m.startswith(p)]
    for m in metrics:
        if m not in available:
            raise PinnerformerError(f"seeds: no metric {m!r} in the reports (they have {', '.join(available)})")
    rows = []
    labels = [[label for label, _, _ in lab] for lab in labelled]
    for report, other in zip(reports[1:], labels[1:]):  # e.g. a blend or a baseline in one report and not the other
        if other != labels[0]:
            raise PinnerformerError(f"{report}: rows {other}, the first report's are {labels[0]}")
    for j, label in enumerate(labels[0]):
        per_seed = {m: [lab[j][2][m].mean for lab in labelled] for m in metrics if m in labelled[0][j][2]}
        rows.append(SeedRow(row=label, per_seed=per_seed, mean={m: statistics.fmean(v) for m, v in per_seed.items()},
                            std={m: statistics.stdev(v) for m, v in per_seed.items()}))
    curves = [SeedCurve(variant=row.variant, seed=r.seed, metric=next(iter(row.validation)), values=_curve(row, log),
                        best_epoch=row.best_epoch)
              for r in results for row in r.rows if row.refit_of is None]
    compared = _same_configs(results, reports)
    if compared < len(results[0].rows):
        log(f"note: {len(results[0].rows) - compared} of {len(results[0].rows)} variant(s) not compared config by "
            "config: their runs are not all here (the reports' settings were)")
    result = SeedsResult(reports=[portable_path(r) for r in reports], seeds=seeds, grid=results[0].grid,
                         preset=results[0].preset, dataset=results[0].dataset, fingerprint=results[0].fingerprint,
                         protocol=results[0].protocol, metrics=metrics, rows=rows, curves=curves,
                         configs_compared=compared, command=command, date=dt.date.today().isoformat())
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "results.json", result)
    plot(result, output / "seeds.png")
    write_text_atomic(output / "report.md", markdown(result, "seeds.png"))
    log(f"wrote {output / 'report.md'}")
    return result


def markdown(result: SeedsResult, png: str) -> str:
    seeds = " / ".join(str(s) for s in result.seeds)
    lines = [f"# Over seeds: {result.grid}, preset {result.preset}", "",
             f"- dataset: `{result.dataset}` (fingerprint `{result.fingerprint}`); protocol: {result.protocol}; "
             "test users, as in each report",
             "- reports: " + ", ".join(f"`{r}` (seed {s})" for r, s in zip(result.reports, result.seeds)),
             f"- configurations compared run by run for {result.configs_compared} variant(s) (identical but for the "
             "seed, a distilled network's teacher and a refit's epoch count); every report has the same grid, preset, "
             "epoch budget, data and variants",
             f"- reproduce: `{result.command}` ({result.date})", "",
             "| row | " + " | ".join(f"{m}: mean ± sd | {m}: seeds {seeds}" for m in result.metrics) + " |",
             "|---|" + "---|---|" * len(result.metrics)]
    for r in result.rows:
        lines.append(f"| {r.row} | " + " | ".join(
            f"{r.mean[m]:.4f} ± {r.std[m]:.4f} | " + " / ".join(f"{v:.4f}" for v in r.per_seed[m])
            if m in r.per_seed else " | " for m in result.metrics) + " |")
    lines += ["", "sd: the sample standard deviation over seeds; each report gives every number's 95% bootstrap "
              "interval over users.", "", "Validation curves (the selection metric at the end of each epoch; the "
              "checkpoint kept is the best epoch's):", "",
              "| variant | seed | best epoch | curve (epochs 0, 1, 2, …) |",
              "|---|---|---|---|"]
    for c in result.curves:
        lines.append(f"| {c.variant} | {c.seed} | {c.best_epoch} | "
                     + (" ".join(f"{v:.4f}" for v in c.values)
                        or "(none: the report predates curves and its finished run is not here)") + " |")
    lines += ["", f"![seeds]({png})"]
    return "\n".join(lines) + "\n"


def plot(result: SeedsResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result.metrics[0]
    # the models' rows: the baselines do not learn, so their seeds agree and would only stretch the axis
    rows = [r for r in result.rows if metric in r.per_seed and not r.row.startswith("baseline:")]
    fig, (curves, dots) = plt.subplots(1, 2, figsize=(12, max(3.6, 0.32 * len(rows) + 1.2)))
    for c in result.curves:
        if c.values:
            line, = curves.plot(range(len(c.values)), c.values, label=f"{c.variant}, seed {c.seed}")
            curves.plot([c.best_epoch], [c.values[c.best_epoch]], "o", color=line.get_color())
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"validation {result.curves[0].metric if result.curves else ''}")
    curves.set_title("validation curves (dot: the epoch kept)")
    if any(c.values for c in result.curves):
        curves.legend(fontsize=7)
    for y, r in enumerate(rows):
        dots.plot(r.per_seed[metric], [y] * len(r.per_seed[metric]), "o", color="#4878a8", alpha=0.7)
        dots.plot([r.mean[metric]] * 2, [y - 0.3, y + 0.3], color="black")
    dots.set_yticks(range(len(rows)), [r.row for r in rows], fontsize=7)
    dots.invert_yaxis()
    dots.set_title(f"test {metric}: each seed (dot) and the mean (bar)")
    fig.suptitle(f"{result.grid}, preset {result.preset} — {Path(result.dataset).name}, seeds {result.seeds}",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path

