"""`pinnerformer train`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pinnerformer.cli.common import app, console, first_rank, log, run_guarded
from pinnerformer.errors import PinnerformerError


@app.command("train")
def train(
    ctx: typer.Context,
    dataset: Path = typer.Option(..., "--dataset", "-d", help="A prepared dataset directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory (checkpoints, metrics, config)."),
    preset: Optional[str] = typer.Option(None, help="small (default) | loo | loo-ensemble | paper (loo: the leave-one-out default; loo-ensemble: three of it)"),
    objective: Optional[str] = typer.Option(None, help="dense-all-action | all-action | sasrec | next-action"),
    negatives: Optional[str] = typer.Option(None, help="mixed | in-batch | random | full (softmax over every item)"),
    no_logq: bool = typer.Option(False, "--no-logq", help="Turn the logQ correction off."),
    config: Optional[Path] = typer.Option(None, help="JSON file overriding preset values (unknown keys are errors)."),
    protocol: Optional[str] = typer.Option(None, help="auto | future-window | leave-one-out (validation)."),
    max_epochs: Optional[int] = typer.Option(None, help="Override optim.max_epochs."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Stop after this many steps (then validate)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    seed: Optional[int] = typer.Option(None, help="Override the seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    nproc: int = typer.Option(1, min=1, help="Train on this many processes of this machine (torchrun; gloo on CPU, "
                              "NCCL on GPU); several machines: torchrun ... -m pinnerformer.cli train "
                              "(docs/distributed.md)."),
):
    """Train a PinnerFormer user tower (and item tower) with early stopping on validation data."""

    if nproc > 1:  # this command again under torchrun, without --nproc: each process is one rank
        from pinnerformer.distributed.launch import relaunch

        raise typer.Exit(relaunch(nproc, ctx.find_root().meta.get("argv") or sys.argv[1:]))

    def body():
        from pinnerformer.api import train as train_run
        from pinnerformer.config import merge_dicts
        from pinnerformer.training.config import load_config, read_config_file

        over = {"loss": {"objective": objective, "negatives": negatives, "logq": False if no_logq else None},
                "optim": {"max_epochs": max_epochs}, "eval": {"protocol": protocol}, "device": device, "seed": seed}
        over = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
                for k, v in over.items() if v is not None}
        if resume and (output / "config.json").exists():  # the run's own config; given options must not change it
            from pinnerformer.runs import RunDir

            run = RunDir(output)
            if preset is not None and preset != run.config.preset:
                raise PinnerformerError(f"--resume continues {output} with its own configuration; it was made with "
                                        f"--preset {run.config.preset}, not {preset}")
            file_over = read_config_file(config) if config else {}
            from pinnerformer.data import Dataset

            cfg = run.resume_config(merge_dicts(file_over, over), log=log, ds=Dataset.open(dataset))
        else:
            cfg = load_config(preset or "small", config, over)  # the values are checked there (unknown ones named)
        summary = train_run(dataset, output, config=cfg, resume=resume, max_steps=max_steps, progress=progress,
                            log=log)
        if first_rank():
            console.print_json(summary.model_dump_json())

    run_guarded(body)
