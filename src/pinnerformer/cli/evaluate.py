"""`pinnerformer evaluate`, `pinnerformer experiment` and `pinnerformer seeds`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pinnerformer.cli.common import app, command_line, log, parse_list, run_guarded


@app.command("evaluate")
def evaluate(
    run: Path = typer.Option(..., "--run", "-r", help="A training run directory."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    protocol: Optional[str] = typer.Option(None, help="future-window | leave-one-out (default: the run's)."),
    split: str = typer.Option("test", help="test | validation users."),
    cutoff: Optional[str] = typer.Option(None, help="future-window cut-off day(s), YYYY-MM-DD[,YYYY-MM-DD…] "
                                         "(pooled; default: the day with the most eligible users)."),
    label_days: float = typer.Option(14.0, help="future-window label horizon in days."),
    k: int = typer.Option(10, "-k", "--k", help="Cut-off rank k."),
    index_size: Optional[int] = typer.Option(None, help="Rank against a random pool of N items (default: all)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    frequency: Optional[str] = typer.Option(None, help="future-window: once,daily,realtime (comma list) — recall "
                                            "when the embedding is refreshed at that rate; reports realtime→daily."),
    per_user_cutoffs: bool = typer.Option(False, "--per-user-cutoffs", help="future-window: score each user at a "
                                          "cut-off of their own (used anyway when one day leaves < 30 users)."),
    exclude_history: bool = typer.Option(False, "--exclude-history", help="Remove each user's own earlier items from "
                                         "the ranking (the S3-Rec / ICLRec / eSASRec leave-one-out variant)."),
    item_knn: Optional[bool] = typer.Option(None, "--item-knn/--no-item-knn", help="Leave-one-out: score the "
                                            "network blended with item-to-item neighbours, λ chosen on validation "
                                            "(default: the run's blend.item_knn)."),
    blend_from: Optional[Path] = typer.Option(None, "--blend-from", help="A refit (eval.refit_epochs): blend it "
                                              "with the λ chosen on validation by the run it repeats (given here), "
                                              "as its epoch count was; its neighbours fit on the refit's data."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Score a trained run on held-out users beside baselines; writes JSON and Markdown into RUN/eval/."""

    def body():
        from pinnerformer.api import evaluate as evaluate_run
        from pinnerformer.evaluation.report import markdown

        report = evaluate_run(run, dataset, item_knn=item_knn, blend_from=blend_from, log=log, protocol=protocol,
                              split=split, cutoffs=parse_list(cutoff), label_days=label_days, k=k,
                              index_size=index_size, checkpoint=checkpoint, frequency=parse_list(frequency),
                              exclude_history=exclude_history, per_user_cutoffs=per_user_cutoffs, progress=progress)
        print(markdown(report))

    run_guarded(body)


@app.command("experiment")
def experiment(
    ctx: typer.Context,
    dataset: Path = typer.Option(..., "--dataset", "-d", help="A prepared dataset directory."),
    grid: str = typer.Option(..., help="objectives | negatives | features | frequency | default (one variant: the "
                             "preset and config as given)"),
    output: Path = typer.Option(..., "--output", "-o", help="Report directory (runs, report.md, results.json, PNG)."),
    preset: str = typer.Option("small", help="small | loo | loo-ensemble | paper"),
    config: Optional[Path] = typer.Option(None, help="JSON config shared by every variant."),
    max_epochs: Optional[int] = typer.Option(None, help="Epoch budget for every variant."),
    seed: int = typer.Option(0, help="Seed shared by every variant."),
    cutoff: Optional[str] = typer.Option(None, help="future-window cut-off day(s) YYYY-MM-DD[,…], pooled (default: "
                                         "the day with the most eligible users)."),
    refit: bool = typer.Option(False, "--refit", help="Leave-one-out: also train each variant again on the "
                               "validation targets too, for the epochs it chose on validation, and report that network "
                               "beside it (not like for like with published numbers, which are not refit)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Train and evaluate every variant of one ablation grid; write a Markdown table and PNG plots."""

    def body():
        from pinnerformer.runs.experiment import run_experiment

        run_experiment(dataset, grid, output, preset, config, max_epochs, seed, progress, command=command_line(ctx),
                       log=log, cutoffs=parse_list(cutoff), refit=refit)
        print((output / "report.md").read_text())

    run_guarded(body)


@app.command("seeds")
def seeds(
    ctx: typer.Context,
    reports: list[Path] = typer.Argument(..., help="Report folders of one experiment run with different --seed."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for report.md, results.json and seeds.png."),
    metrics: Optional[str] = typer.Option(None, help="Comma list (default: the reports' ndcg@k, hr@k, recall@k)."),
):
    """One experiment's reports over seeds: each row's mean and spread, and the validation curves of every seed."""

    def body():
        from pinnerformer.runs.seeds import summarise_seeds

        summarise_seeds(reports, output, parse_list(metrics), command=command_line(ctx), log=log)
        print((output / "report.md").read_text())

    run_guarded(body)
