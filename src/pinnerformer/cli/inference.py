"""`pinnerformer embed` and `pinnerformer simulate-daily`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pinnerformer.cli.common import app, command_line, log, run_guarded


@app.command("embed")
def embed(
    run: Path = typer.Option(..., "--run", "-r", help="A training run directory (uses checkpoints/best.pt)."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    as_of: str = typer.Option(..., "--as-of", help="YYYY-MM-DD: embed each user's actions up to the end of this "
                              "day (UTC)."),
    output: Path = typer.Option(..., "--output", "-o", help="Snapshot root: the snapshot goes to OUTPUT/DAY/."),
    dtype: str = typer.Option("float32", help="float32 | float16 vectors in the Parquet file."),
    engine: str = typer.Option("local", help="local | ray (needs the [ray] extra)."),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster (default: start a local one)."),
    ray_actors: int = typer.Option(2, help="Ray: actors in the pool, each holding the model once."),
    ray_cpus_per_actor: float = typer.Option(0.5, help="Ray: CPUs reserved per actor (fractions allowed)."),
    shard_users: int = typer.Option(4096, min=1, help="Users per shard: the unit of work and of restart."),
    batch_size: int = typer.Option(256, min=1, help="Users per model batch."),
    device: str = typer.Option("cpu", help="local engine: cpu | cuda | auto (cuda runs in bf16)."),
    compile_model: bool = typer.Option(False, "--compile", help="local engine: torch.compile the transformer (faster "
                                       "on GPU; vectors differ from eager ones in the last bits, so the first compiled "
                                       "day recomputes everyone)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    force: bool = typer.Option(False, help="Recompute a day that already has a complete snapshot."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Daily batch inference: user embeddings as of a day, incremental over the previous snapshot."""

    def body():
        from pinnerformer.api import embed_day
        from pinnerformer.data.clock import parse_day

        embed_day(run, dataset, parse_day(as_of, "--as-of"), output, engine=engine, force=force,
                  ray_address=ray_address, ray_actors=ray_actors, ray_cpus_per_actor=ray_cpus_per_actor,
                  progress=progress, log=log, dtype=dtype, checkpoint=checkpoint, shard_users=shard_users,
                  batch_size=batch_size, device=device, compile=compile_model)

    run_guarded(body)


@app.command("simulate-daily")
def simulate_daily(
    ctx: typer.Context,
    run: Path = typer.Option(..., "--run", "-r", help="A future-window training run directory."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    first: str = typer.Option(..., "--from", help="First day, YYYY-MM-DD."),
    last: str = typer.Option(..., "--to", help="Last day, YYYY-MM-DD."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where snapshots and the report go "
                                          "(default: RUN/simulate-daily)."),
    k: int = typer.Option(10, "-k", "--k", help="Recall cut-off rank."),
    label_days: float = typer.Option(14.0, help="Label horizon in days."),
    snapshots: Optional[Path] = typer.Option(None, help="Snapshot root (default: OUTPUT/snapshots)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Replay the daily job day by day; report users recomputed and Recall@k of the snapshot in use."""

    def body():
        from pinnerformer.data.clock import parse_day
        from pinnerformer.data.dataset import Dataset
        from pinnerformer.inference.simulate import markdown, simulate_daily as simulate

        r = simulate(run, Dataset.open(dataset), parse_day(first, "--from"), parse_day(last, "--to"),
                     output or run / "simulate-daily", k, label_days, log=log, progress=progress,
                     command=command_line(ctx), snapshots=snapshots)
        print(markdown(r))

    run_guarded(body)
