"""`pinnerformer experiment`: train and evaluate the variants of one ablation with a shared seed and budget.

Grids (the PinnerFormer paper's tables):
    objectives  the four training objectives
    negatives   {in-batch, random, mixed} × {logQ, no logQ}
    features    leave one feature out: content vector, time, action type, duration/surface (where the data
                has them), position
    frequency   inference frequency {once, daily, realtime} for the dense all-action vs the SASRec objective
    default     one variant: the preset and config as given (a plain report, e.g. `--preset loo` under the
                leave-one-out protocol)

Every variant trains in REPORT_DIR/runs/<variant> with the same preset, config, seed and epoch budget, is
scored by `evaluate` on the same held-out users, and lands in REPORT_DIR/report.md (table with the best validation
number beside the test numbers, the baselines with their intervals, protocol, data fingerprint, the command, wall
time, machine and date), results.json and a PNG of bars with 95% intervals. A finished variant is
reused when the experiment is run again (its config must match); an interrupted one resumes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np

from pinnerformer.config import StrictModel, merge_dicts
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.blend import KNN, NETWORK
from pinnerformer.evaluation.evaluate import EvaluateOptions
from pinnerformer.evaluation.metrics import P90_COVERAGE
from pinnerformer.evaluation.protocols import resolve_protocol
from pinnerformer.evaluation.report import MODEL, EvaluationReport, blend_text, history_text
from pinnerformer.evaluation.tasks import parse_cutoffs
from pinnerformer.io import atomic_path, write_json_atomic, write_text_atomic, portable_path
from pinnerformer.runs.evaluate import evaluate_run, teacher_for
from pinnerformer.runs.run_dir import RunDir
from pinnerformer.training import run_files as rf
from pinnerformer.training.config import TrainConfig, load_config
from pinnerformer.training.retrieval import fitted_max_len, retrieval_loop

GRIDS = ["objectives", "negatives", "features", "frequency", "default"]


def variants(grid: str, ds: Dataset, item_features: str = "auto") -> list[tuple[str, dict]]:
    """item_features: the base configuration's (a preset that uses item IDs only gets no "− content" variant)."""
    m = ds.manifest
    if grid == "objectives":
        return [(o, {"loss": {"objective": o}}) for o in ["next-action", "sasrec", "all-action", "dense-all-action"]]
    if grid == "negatives":
        return [(f"{n} + logQ" if q else n, {"loss": {"negatives": n, "logq": q}})
                for n in ["in-batch", "random", "mixed"] for q in (True, False)]
    if grid == "features":
        out = [("all features", {})]
        if m.content_vectors is not None and item_features != "id":
            out.append(("− content vector", {"model": {"item_features": "id"}}))
        if m.clock == "seconds":
            out.append(("− time", {"model": {"time_features": False}}))
        if len(m.actions) > 1:
            out.append(("− action type", {"model": {"action_features": False}}))
        if m.has_duration or m.has_surface:
            out.append(("− duration/surface", {"model": {"duration_surface_features": False}}))
        out.append(("− position", {"model": {"position_features": False}}))
        return out
    if grid == "frequency":
        return [(o, {"loss": {"objective": o}}) for o in ["dense-all-action", "sasrec"]]
    if grid == "default":
        return [(MODEL, {})]
    raise PinnerformerError(f"unknown grid '{grid}': expected one of {', '.join(GRIDS)}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.replace("−", "no")).strip("-").replace("--", "-")


class ExperimentRow(StrictModel):
    variant: str
    run: str
    best_epoch: int
    validation: dict[str, float]  # the selection metric's best value on validation
    report: EvaluationReport  # the test report, as `pinnerformer evaluate` writes it
    # leave-one-out: the same model with each user's input items removed from the ranking (`evaluate
    # --exclude-history`, the literature's full-ranking protocol)
    history_removed: EvaluationReport | None = None
    wall_s: float  # this invocation's work on the variant (training, unless reused, and evaluation)
    train_wall_s: float | None = None  # the run's training time (its summary; resumed segments summed)
    reused: bool = False  # the run had finished in an earlier invocation: only evaluated here
    # leave-one-out refit (`experiment --refit`): the variant trained again, validation targets included, for the
    # epochs its selection run chose (eval.refit_epochs), never validated; blended (when the variant blends) with the
    # λ its selection run chose on validation, its network alone beside it
    refit_of: str | None = None
    # the run's selection metric on validation at the end of each epoch (epoch 0 first; empty for a refit)
    curve: list[float] = []
    # leave-one-out: whether the checkpoint (and the `validation` numbers) were chosen with the history removed from
    # the ranking (eval.exclude_history); the report puts `validation` in that protocol's rows (None: reports made
    # before the blend's λ was chosen per protocol, when both protocols' rows shared one λ: the history-in rows)
    selected_history_removed: bool | None = None


class ExperimentResult(StrictModel):
    grid: str
    dataset: str
    fingerprint: str
    preset: str
    seed: int
    max_epochs: int | None
    command: str
    protocol: str
    rows: list[ExperimentRow]
    wall_s: float
    machine: str
    date: str


def run_experiment(dataset: Path, grid: str, output: Path, preset: str = "small", config_file: Path | None = None,
                   max_epochs: int | None = None, seed: int = 0, progress: bool = True, command: str = "",
                   log=print, cutoffs: list[str] | None = None, refit: bool = False) -> ExperimentResult:
    """refit (leave-one-out): each variant also trained again on the validation targets too, for the epochs its
    run chose on validation (eval.refit_epochs), and reported beside it, blended with the λ that run chose when the
    preset blends (`runs.evaluate.carried_blend`), its network alone beside it."""
    t0 = time.perf_counter()
    ds = Dataset.open(dataset)
    if grid == "frequency" and ds.manifest.clock != "seconds":
        raise PinnerformerError("the frequency grid needs real timestamps; this dataset is order-only")
    # future-window: pooled cut-offs (default: evaluate's single best day); checked before any training
    options = EvaluateOptions(cutoffs=cutoffs, seed=seed, frequency=["once", "daily", "realtime"] if grid == "frequency"
                              else None)
    parse_cutoffs(options.cutoffs, ds)
    base = json.loads(Path(config_file).read_text()) if config_file else {}
    base = merge_dicts(base, {"seed": seed, **({"optim": {"max_epochs": max_epochs}} if max_epochs else {})})
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    vs = variants(grid, ds, load_config(preset, None, base).model.item_features)
    if refit and resolve_protocol(load_config(preset, None, base).eval.protocol, ds.manifest.clock) != "leave-one-out":
        raise PinnerformerError("--refit trains again on the validation targets: it is for the leave-one-out protocol")
    for i, (name, over) in enumerate(vs):
        cfg = fitted_max_len(load_config(preset, None, merge_dicts(base, over)), ds)
        log(f"[{i + 1}/{len(vs)}] {name} -> {output / 'runs' / _slug(name)}")
        row = _variant_row(ds, name, cfg, output / "runs" / _slug(name), options, progress, log)
        rows.append(row)
        if refit:
            if row.best_epoch < 0:
                raise PinnerformerError(f"--refit: {row.run} selected no epoch on validation, so there is no epoch "
                                        "count to refit for")
            epochs = row.best_epoch + 1  # as many epochs as the run chose on validation, on the same schedule
            rcfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"refit_epochs": epochs})})
            log(f"[{i + 1}/{len(vs)}] {name}, refit ({epochs} epochs) -> {output / 'runs' / (_slug(name) + '-refit')}")
            rows.append(_variant_row(ds, f"{name}, refit", rcfg, output / "runs" / (_slug(name) + "-refit"),
                                     options, progress, log, refit_of=name, selection=Path(row.run)))
    result = ExperimentResult(grid=grid, dataset=portable_path(ds.path), fingerprint=ds.manifest.fingerprint,
                              preset=preset, seed=seed, max_epochs=max_epochs, command=command,
                              protocol=rows[0].report.protocol, rows=rows, wall_s=round(time.perf_counter() - t0, 1),
                              machine=machine(), date=dt.date.today().isoformat())
    write_json_atomic(output / "results.json", result)
    png = plot(result, output / f"{grid}.png")
    write_text_atomic(output / "report.md", report_markdown(result, png.name))
    log(f"wrote {output / 'report.md'} ({result.wall_s:.0f} s)")
    return result


def _variant_row(ds: Dataset, name: str, cfg: TrainConfig, run_dir: Path, options: EvaluateOptions, progress: bool,
                 log, refit_of: str | None = None, selection: Path | None = None) -> ExperimentRow:
    """One variant trained (or its finished run reused, or its interrupted run resumed) and scored on test, with its
    history in and (leave-one-out) removed. A refit (refit_of, the run it repeats at `selection`): blended, when
    the configuration blends, with the λ that run chose on validation."""
    tv = time.perf_counter()
    if (run_dir / rf.CONFIG).exists():
        # read through today's schema: options added since then take their defaults (the old behaviour)
        earlier = TrainConfig.model_validate(json.loads((run_dir / rf.CONFIG).read_text())["config"])
        # the blend is applied after training: a finished run serves any blend setting
        if earlier.model_dump(exclude={"blend"}) != cfg.model_dump(exclude={"blend"}):
            raise PinnerformerError(f"{run_dir} was made with another configuration (preset, config, seed or "
                                    "epoch budget): use a new --output for a different experiment")
    sub_log = lambda s: log("  " + s)  # noqa: E731
    reused = (run_dir / rf.SUMMARY).exists()
    if reused:
        log("  finished earlier: reusing its checkpoint")
    else:
        retrieval_loop(ds, cfg, run_dir, log=sub_log, teacher=teacher_for(cfg, ds, log=sub_log)).fit(
            resume=(run_dir / rf.CONFIG).exists(), progress=progress)
    run = RunDir(run_dir)
    summary = run.summary()
    # a refit's λ cannot be chosen on the validation targets it trained on: the selection run's is carried over
    blend_from = RunDir(selection) if refit_of is not None and cfg.blend.item_knn else None
    blend = None if refit_of is not None else cfg.blend  # a refit: its own blend section, as the run it repeats
    report, _, _ = evaluate_run(run, ds, options, log=sub_log, blend=blend, progress=progress, blend_from=blend_from)
    removed = None
    if report.protocol == "leave-one-out":
        removed, _, _ = evaluate_run(run, ds, options.model_copy(update={"exclude_history": True}), log=sub_log,
                                     blend=blend, progress=progress, blend_from=blend_from)
    validation = {} if refit_of is not None else {summary.metric: summary.best}
    # the blend's validation number at its chosen λ, under the protocol the run was selected with
    chosen = next((r.blend for r in (report, removed) if r is not None and r.blend is not None
                   and r.blend.history_excluded == cfg.eval.exclude_history), None)
    if chosen is not None and refit_of is None:
        validation[f"{chosen.metric} blended"] = chosen.validation[f"{chosen.weight:g}"]
    return ExperimentRow(variant=name, run=str(run_dir), best_epoch=summary.best_epoch, validation=validation,
                         report=report, history_removed=removed, wall_s=round(time.perf_counter() - tv, 1),
                         selected_history_removed=cfg.eval.exclude_history if removed is not None else None,
                         train_wall_s=summary.wall_s, reused=reused, refit_of=refit_of,
                         curve=run.validation_curve(summary.metric))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def _train_minutes(result: ExperimentResult) -> str:
    return ", ".join(f"{r.variant} {r.train_wall_s / 60:.1f} min" for r in result.rows if r.train_wall_s is not None)


def _cell(v) -> str:
    return f"{v.mean:.4f}" + (f" [{v.ci95[0]:.4f}, {v.ci95[1]:.4f}]" if v.ci95 else "")


def _metrics(result: ExperimentResult) -> list[str]:
    return list(result.rows[0].report.model.keys())


def labelled_results(result: ExperimentResult, history_removed: bool = False
                     ) -> list[tuple[str, ExperimentRow | None, dict]]:
    """The report's rows for one protocol, as (label, the variant's row or None, metric -> value): each variant (and,
    when blended, its own network alone; for a refit, its own neighbours too, fit on what it trained on), then the
    baselines (the first variant's), scored by the same code on the same users."""
    report_of = (lambda r: r.history_removed) if history_removed else (lambda r: r.report)  # noqa: E731
    suffix = ", history removed" if history_removed else ""
    out: list[tuple[str, ExperimentRow | None, dict]] = []
    for r in result.rows:
        rep = report_of(r)
        out.append((f"{r.variant}{suffix}", r, rep.model))
        if NETWORK in rep.results:
            out.append((f"{r.variant}: network alone{suffix}", None, rep.results[NETWORK]))
        if r.refit_of is not None and KNN in rep.results:  # its neighbours saw the validation targets too
            out.append((f"{r.variant}: neighbours alone{suffix}", None, rep.results[KNN]))
    for name, res in report_of(result.rows[0]).baselines.items():
        if name != NETWORK:  # a variant's own row above, not a baseline
            out.append((f"baseline: {name}{suffix}", None, res))
    return out


def _table_rows(result: ExperimentResult, metrics: list[str], history_removed: bool) -> list[str]:
    lines = []
    for label, r, values in labelled_results(result, history_removed):
        cells = " | ".join(_cell(values[m]) if m in values else "" for m in metrics)
        if r is None:
            lines.append(f"| {label} | {cells} | | |")
            continue
        shown_here = history_removed == bool(r.selected_history_removed)  # the protocol the numbers were chosen under
        val = " " + ", ".join(f"{k} {v:.4f}" for k, v in r.validation.items()) + " " if shown_here else " "
        lines.append(f"| {label} | {cells} | {r.best_epoch}{' (the last: a refit)' if r.refit_of else ''} |{val}|")
    return lines


def report_markdown(result: ExperimentResult, png: str) -> str:
    first = result.rows[0].report
    metrics = _metrics(result)
    lines = [f"# Ablation: {result.grid}", "",
             f"- dataset: `{result.dataset}` (fingerprint `{result.fingerprint}`)",
             f"- protocol: {first.protocol}, {first.split} users; index: {first.index}"
             + (f"; cut-off(s) {', '.join(first.cutoffs)}, labels {first.label_days:g} days" if first.cutoffs else ""),
             f"- user-windows: {first.user_windows}; ties {first.ties}; {history_text(first)}",
             *[f"- {r.variant}{', history removed' if rep is r.history_removed else ''}: {blend_text(rep.blend)}"
               for r in result.rows for rep in (r.report, r.history_removed)
               if rep is not None and rep.blend is not None],
             *[f"- {r.variant}: {r.refit_of} trained again from the same seed on every timeline but its last action "
               f"(each user's validation target trained on too) for {r.best_epoch + 1} epoch(s), the number "
               f"{r.refit_of} chose on validation, and scored "
               + ("blended with the λ it chose on validation too, its neighbours refit likewise (the network alone "
                  "beside it)" if r.report.blend is not None else "as the network alone")
               + "; not validated (nothing is left to validate on). The published leave-one-out networks are not "
               "refit: this row is not like for like with them" for r in result.rows if r.refit_of is not None],
             f"- preset {result.preset}, seed {result.seed}, max epochs {result.max_epochs or 'preset'}; "
             "model selection on validation users only (early stopping), numbers below on test users",
             f"- reproduce: `{result.command}` ({result.wall_s / 60:.1f} min on the machine that made it: "
             f"{result.machine}, {result.date}"
             + (f"; finished runs were reused, their training took {_train_minutes(result)}" if any(
                 r.reused for r in result.rows) else "") + ")", "",
             "| variant | " + " | ".join(metrics) + " | best epoch | validation (selection) |",
             "|---|" + "---|" * (len(metrics) + 2)]
    lines += _table_rows(result, metrics, history_removed=False)
    removed = result.rows[0].history_removed
    if removed is not None:  # the same models and users with each user's input items removed from the ranking
        lines += _table_rows(result, metrics, history_removed=True)
        lines += ["", f"Rows marked \"history removed\": {history_text(removed)} — the protocol of the published "
                  "full-ranking numbers."]
    if result.grid == "frequency":
        lines += ["", "| objective | once | daily | realtime | realtime → daily |", "|---|---|---|---|---|"]
        for r in result.rows:
            fr = r.report.inference_frequency
            lines.append(f"| {r.variant} | " + " | ".join(f"{fr.results[f].mean:.4f}" for f in ("once", "daily", "realtime"))
                         + f" | {fr.realtime_to_daily_drop:+.1%} |")
    lines += ["", f"![{result.grid}]({png})", "", "Intervals: 95% bootstrap over user-windows."]
    return "\n".join(lines) + "\n"


def _bars(ax, x, values, **kw) -> None:
    means = np.array([v.mean for v in values])
    err = np.array([[v.mean - v.ci95[0], v.ci95[1] - v.mean] for v in values]).T
    ax.bar(x, means, yerr=err, **kw)


def plot(result: ExperimentResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in _metrics(result) if not m.startswith(P90_COVERAGE)] or _metrics(result)
    freq = result.grid == "frequency"
    n_panels = len(metrics) + int(freq)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.5 * n_panels, 3.6), squeeze=False)
    names = [r.variant for r in result.rows]
    if freq:  # grouped bars: recall per objective when the embedding is refreshed once / daily / realtime
        ax = axes[0][-1]
        for j, f in enumerate(["once", "daily", "realtime"]):
            _bars(ax, np.arange(len(names)) + (j - 1) * 0.27,
                  [r.report.inference_frequency.results[f] for r in result.rows], width=0.27, capsize=3, label=f)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"{result.rows[0].report.inference_frequency.metric} by inference frequency")
        ax.legend(fontsize=8)
    first = result.rows[0].report
    baselines = list(first.baselines)
    labels = names + [n.split(" (")[0] for n in baselines]
    for ax, m in zip(axes[0], metrics):
        vals = [r.report.model[m] for r in result.rows] + [first.results[b][m] for b in baselines]
        _bars(ax, range(len(labels)), vals, capsize=4, color=["#4878a8"] * len(names) + ["#a0a0a0"] * len(baselines))
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(m)
    fig.suptitle(f"{result.grid} — {Path(result.dataset).name} ({result.protocol}, 95% CI)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
