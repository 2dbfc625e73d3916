"""`pinnerformer rank prepare | train | evaluate | experiment | score`: the ranker (TransAct, DCN v2, multi-task)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pinnerformer.cli.common import app, command_line, console, first_rank, log, parse_list, run_guarded

rank_app = typer.Typer(help="The ranker: request data, TransAct + PinnerFormer + DCN v2 multi-task training, HIT@3.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(rank_app, name="rank")


@rank_app.command("prepare")
def prepare(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="A prepared dataset directory (with real timestamps)."),
    output: Path = typer.Option(..., "--output", "-o", help="The ranking data directory to write."),
    request: Optional[str] = typer.Option(None, help="day | session | within-session (the session's second half, scored "
                                           "at its middle action: its first half is the realtime sequence) | logged "
                                           "(default: logged for MIND, else day)."),
    heads: Optional[str] = typer.Option(None, help="Heads 'NAME=ACTION[,ACTION…]; …', a '-' before the actions of "
                                        "a negative head (default per format, e.g. MovieLens 'save=love; "
                                        "like=love,like; hide=-dislike')."),
    split: str = typer.Option("0.7,0.15,0.15", help="Fractions of the requests for train, validation, test "
                              "(cut at UTC midnights, in time order), or the last UTC day of train and of "
                              "validation: 2001-03-23,2001-11-22 is train through 2001-03-23, validation through "
                              "2001-11-22, test after (both days within the requests' span). Validation and test "
                              "must each hold at least 10 requests, and validation a request engaged with on every "
                              "head (else refused)."),
    feature_share: float = typer.Option(0.5, help="Share of the training period whose requests only the "
                                        "PinnerFormer behind the feature learns from (0: it trains on the ranker's "
                                        "training period)."),
    session_gap_minutes: float = typer.Option(30.0, help="--request session / within-session: the inactivity gap."),
    min_candidates: int = typer.Option(2, min=2, help="Requests with fewer distinct items are skipped (counted)."),
    max_candidates: int = typer.Option(100, min=2, help="Larger requests of the feature and training periods keep a "
                                       "seeded sample of this many (the rest counted); validation and test requests "
                                       "keep every candidate, as served."),
    pinnerformer: Optional[Path] = typer.Option(None, help="A PinnerFormer run trained on the training period only "
                                                "(eval.until); default: train one into OUTPUT/pinnerformer."),
    pf_max_steps: int = typer.Option(600, min=1, help="Steps of the PinnerFormer trained for the feature."),
    item_vectors: str = typer.Option("auto", help="Frozen item vectors of sequences and candidates: content (the "
                                     "dataset's) | pinnerformer (the feature model's item vectors) | interests "
                                     "(a fixed vector per category) | auto (content if any, else pinnerformer; "
                                     "interests instead, with a warning, when the feature PinnerFormer's validation "
                                     "recall is 0 or not above popularity's)."),
    int8_dim: int = typer.Option(64, help="Width of TransAct V2's int8 item table (wider vectors are narrowed "
                                 "by a fixed orthonormal projection)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT (only ranking data: "
                                   "any other directory or file is refused)."),
):
    """Build ranking requests (candidates, labels per head, sequences, yesterday's PinnerFormer vectors, time split)."""

    def body():
        from pinnerformer.api import prepare_requests

        prepare_requests(dataset, output, request=request, heads=heads, split=split, pinnerformer=pinnerformer,
                         pf_max_steps=pf_max_steps, overwrite=overwrite, progress=True, log=log,
                         feature_share=feature_share, session_gap_minutes=session_gap_minutes,
                         min_candidates=min_candidates, max_candidates=max_candidates, item_vectors=item_vectors,
                         int8_dim=int8_dim, seed=seed)

    run_guarded(body)


@rank_app.command("train")
def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Ranking data written by `rank prepare`."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory."),
    preset: str = typer.Option("default", help="default | fast (shorter sequences and epochs: CPU minutes)."),
    model: Optional[str] = typer.Option(None, help="Sequence feature: transact | transact-v2 (lifelong streams, "
                                        "nearest-neighbour selection) | bst | average | none; or gbdt: "
                                        "gradient-boosted trees (LightGBM) on the point-in-time features, no "
                                        "network."),
    no_pinnerformer: bool = typer.Option(False, "--no-pinnerformer", help="Leave the PinnerFormer feature out."),
    config: Optional[Path] = typer.Option(None, help="JSON file overriding preset values (unknown keys are errors)."),
    max_epochs: Optional[int] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Stop after this many steps (then validate)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    seed: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    progress: bool = typer.Option(True),
    nproc: int = typer.Option(1, min=1, help="Train on this many processes of this machine (torchrun; "
                              "docs/distributed.md)."),
):
    """Train the multi-task ranker (selected on the validation period's HIT@3)."""
    if nproc > 1:  # this command again under torchrun, without --nproc: each process is one rank
        import sys

        from pinnerformer.distributed.launch import relaunch

        raise typer.Exit(relaunch(nproc, ctx.find_root().meta.get("argv") or sys.argv[1:]))

    def body():
        from pinnerformer.api import train_ranker
        from pinnerformer.training.ranking import load_rank_config

        over: dict = {"model": {}, "optim": {}}
        if model == "gbdt":
            over["learner"] = "gbdt"
        elif model is not None:
            over["model"]["sequence"] = model
        if no_pinnerformer:
            over["model"]["use_pinnerformer"] = False
        if max_epochs is not None:
            over["optim"]["max_epochs"] = max_epochs
        if device is not None:
            over["device"] = device
        if seed is not None:
            over["seed"] = seed
        summary = train_ranker(data, output, config=load_rank_config(preset, config, over), resume=resume,
                               max_steps=max_steps, progress=progress, log=log)
        if first_rank():
            console.print_json(summary.model_dump_json())

    run_guarded(body)


@rank_app.command("evaluate")
def evaluate(
    ctx: typer.Context,
    run: list[Path] = typer.Option(..., "--run", "-r", help="Ranking run(s); NAME=PATH to name one."),
    reference: Optional[str] = typer.Option(None, help="The run (its name) that lifts are measured against, e.g. "
                                            "the ranker without sequence features."),
    split: str = typer.Option("test", help="test | validation requests."),
    k: int = typer.Option(3, "-k", "--k", min=1, help="HIT@k."),
    seed: int = typer.Option(0),
):
    """HIT@3 / AUC / grouped AUC per head with 95% intervals, beside random, popularity and PinnerFormer-score
    baselines; writes JSON and Markdown into the first run's eval/."""

    def body():
        from pinnerformer.api import evaluate_rankers
        from pinnerformer.ranking.evaluate import report_markdown

        runs = {}
        for r in run:
            name, eq, path = str(r).partition("=")
            runs[name if eq else Path(name).name] = Path(path if eq else name)
        report = evaluate_rankers(runs, split, reference, k=k, seed=seed, notes=[f"command: {command_line(ctx)}"],
                                  log=log)
        print(report_markdown(report))

    run_guarded(body)


@rank_app.command("experiment")
def experiment(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Ranking data written by `rank prepare`."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the runs, the report and the plots."),
    tables: Optional[str] = typer.Option(None, help="table1,table2,fusion,mask,output (TransAct's, the default); "
                                         "v2-table2,v2-lifelong,v2-nal (TransAct V2's)."),
    preset: str = typer.Option("fast"),
    config: Optional[Path] = typer.Option(None, help="JSON file overriding the preset for every variant."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="At most this many steps per run."),
    seed: int = typer.Option(0),
):
    """The TransAct papers' ablations on one ranking data directory (trains each variant, scores all on test)."""

    def body():
        from pinnerformer.ranking.experiment import run_experiment
        from pinnerformer.training.config import read_config_file

        path = run_experiment(data, output, preset, parse_list(tables), max_steps, seed,
                              overrides=read_config_file(config) if config else None,
                              command=command_line(ctx), log=log)
        print(path.read_text())

    run_guarded(body)


@rank_app.command("score")
def score(
    run: Path = typer.Option(..., "--run", "-r", help="A ranking run."),
    user: str = typer.Option(..., "--user", help="The user's id in the source data."),
    time: str = typer.Option(..., "--time", help="The request's time: Unix seconds or ISO (UTC)."),
    items: str = typer.Option(..., "--items", help="Candidate item ids, comma-separated."),
    snapshot: Optional[Path] = typer.Option(None, help="A daily snapshot of an earlier day, made by the ranking "
                                            "data's PinnerFormer (default: computed as of the request's day)."),
    surface: Optional[str] = typer.Option(None, help="The request's surface, where the data records surfaces "
                                          "(default: not recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the scored candidates as JSON (one object each)."),
):
    """Score one request: per-head probabilities and the served order, with titles (every candidate, whole)."""

    def body():
        import json

        import polars as pl

        from pinnerformer.api import score as score_request

        table = score_request(run, user, time, parse_list(items) or [], snapshot=snapshot, surface=surface)
        if as_json:
            print(json.dumps(table.to_dicts(), indent=2))
            return
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200, tbl_width_chars=250):
            print(table)

    run_guarded(body)
