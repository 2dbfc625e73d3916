"""`pinnerformer quickstart`."""

from __future__ import annotations

from pathlib import Path

import typer

from pinnerformer.cli.common import app, log, run_guarded
from pinnerformer.cli.data import print_stats


@app.command("quickstart")
def quickstart(workdir: Path = typer.Option(Path("quickstart-run"), help="Where outputs go."),
               text: bool = typer.Option(True, help="Embed item text (needs the [text] extra)."),
               train: bool = typer.Option(True, help="Train a model on the prepared data."),
               max_epochs: int = typer.Option(10, help="Training epochs at most (early stopping may end sooner)."),
               rank: bool = typer.Option(True, help="Also build ranking requests and train the TransAct ranker.")):
    """The main job, end to end, on the built-in MovieLens latest-small data."""
    from pinnerformer.quickstart import run_quickstart

    run_guarded(lambda: run_quickstart(workdir, text=text, log=log, show=print_stats, train=train,
                                       max_epochs=max_epochs, rank=rank))
