"""The `pinnerformer` command line. Every command has --help; errors print a message and exit non-zero."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pinnerformer import __version__
from pinnerformer.errors import PinnerformerError

app = typer.Typer(help="Learn user representations from sequences of user actions, and rank with them.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Prepare event logs into datasets and inspect them.", no_args_is_help=True)
items_app = typer.Typer(help="Item features.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(items_app, name="items")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # log lines stay whole (grep-able) in files and CI logs


def run_guarded(fn, *args, **kwargs):
    """Run a command body; a PinnerformerError becomes a clear message and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except PinnerformerError as e:
        print("error: " + str(e), file=sys.stderr)
        raise typer.Exit(code=2) from None


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")):
    """Learn user representations from sequences of user actions, and rank with them."""


@data_app.command("prepare")
def data_prepare(
    format: str = typer.Option(..., "--format", "-f",
                               help="movielens | movielens-latest | sequences | otto | events"),
    input: Path = typer.Option(..., "--input", "-i", help="Source file or folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset directory to write."),
    overwrite: bool = typer.Option(False, help="Replace an existing dataset directory."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid",
                                      help="Skip malformed rows and count them (default: stop at the first)."),
    rating_rule: Optional[str] = typer.Option(None, help="MovieLens rating -> action, e.g. "
                                              "'5=love,4-4.5=like,3-3.5=neutral,0.5-2.5=dislike' (the default)."),
    positive: Optional[str] = typer.Option(None, help="Comma-separated positive action types "
                                           "(MovieLens default: love,like; otto: clicks,carts,orders)."),
    actions: Optional[str] = typer.Option(None, help="events: the allowed action values (others are errors); "
                                          "sequences: the name of the single action (default interact)."),
    min_time: str = typer.Option("1990-01-01", help="Earliest sane timestamp (YYYY-MM-DD, UTC)."),
    max_time: Optional[str] = typer.Option(None, help="Latest sane timestamp (default: tomorrow)."),
    user_col: str = typer.Option("user", help="events: user id column."),
    item_col: str = typer.Option("item", help="events: item id column."),
    time_col: str = typer.Option("timestamp", help="events: time column."),
    action_col: Optional[str] = typer.Option(None, help="events: action type column (default: none, one action)."),
    surface_col: Optional[str] = typer.Option(None, help="events: surface column."),
    duration_col: Optional[str] = typer.Option(None, help="events: duration column (seconds)."),
    time_format: str = typer.Option("unix", help="events: unix | unix-ms | iso | order | a strftime pattern."),
    separator: str = typer.Option(",", help="events: CSV field separator."),
    id_type: str = typer.Option("auto", help="events/sequences: auto | int | str."),
    items: Optional[Path] = typer.Option(None, help="events: item table (CSV or Parquet)."),
    items_id_col: str = typer.Option("item", help="events: item id column of the item table."),
    items_text_col: Optional[str] = typer.Option(None, help="events: item text column."),
    items_interests_col: Optional[str] = typer.Option(None, help="events: item interests column ('|'-separated)."),
    item_attributes: Optional[Path] = typer.Option(None, help="sequences: item -> attributes JSON "
                                                   "(default: a *item2attributes.json beside the input)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Turn a source event log into a canonical dataset directory (events, items, timelines, manifest)."""
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.data.formats import EventColumns, ItemColumns, read_source
    from pinnerformer.data.prepare import parse_day, prepare

    def body():
        sep = "\t" if separator in ("\\t", "tab") else separator
        raw = read_source(
            format, input, skip_invalid=skip_invalid, rating_rule=rating_rule, positive=positive, actions=actions,
            event_columns=EventColumns(user=user_col, item=item_col, time=time_col, action=action_col,
                                       surface=surface_col, duration=duration_col),
            time_format=time_format, separator=sep, id_type=id_type, items_path=items,
            item_columns=ItemColumns(item=items_id_col, text=items_text_col, interests=items_interests_col),
            item_attributes=item_attributes)
        prepare(raw, output, format, skip_invalid=skip_invalid, min_time=parse_day(min_time, "min-time"),
                max_time=parse_day(max_time, "max-time") if max_time else None, overwrite=overwrite,
                log=lambda s: err_console.print(s, highlight=False))
        print_stats(Dataset.open(output), as_json)

    run_guarded(body)


@data_app.command("stats")
def data_stats(dataset: Path = typer.Argument(..., help="A prepared dataset directory."),
               as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """Users, items, events per action type, time range, events per user, positives share, fingerprint."""
    from pinnerformer.data.dataset import Dataset

    run_guarded(lambda: print_stats(Dataset.open(dataset), as_json))


def print_stats(ds, as_json: bool = False) -> dict:
    from pinnerformer.data.stats import dataset_stats

    s = dataset_stats(ds)
    if as_json:
        print(json.dumps(s, indent=2))
        return s
    t = Table(title=f"dataset {ds.path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("format", s["format"])
    t.add_row("users", f"{s['users']:,}")
    t.add_row("items", f"{s['items']:,}  ({s['items_with_text']:,} with text)")
    t.add_row("events", f"{s['events']:,}")
    for name, n in s["events_per_action"].items():
        mark = " (positive)" if name in s["positive_actions"] else ""
        t.add_row(f"  {name}", f"{n:,}{mark}")
    t.add_row("positives share", f"{s['positives_share']:.1%}")
    t.add_row("time range", s["time_range"])
    e = s["events_per_user"]
    t.add_row("events per user", "  ".join([f"min {e['min']}"] + [f"{k} {e[k]:.0f}" for k in
                                            ("p5", "p25", "p50", "p75", "p90", "p99")] + [f"max {e['max']}",
                                                                                     f"mean {e['mean']:.1f}"]))
    t.add_row("content vectors", s["content_vectors"] or "none (models use learned item-ID embeddings)")
    t.add_row("duplicates removed", f"{s['duplicates_removed']:,}")
    t.add_row("skipped", ", ".join(f"{k}: {v:,}" for k, v in s["skipped"].items()) or "nothing")
    for note in s["notes"]:
        t.add_row("note", note)
    t.add_row("fingerprint", s["fingerprint"])
    console.print(t)
    return s


@items_app.command("embed-text")
def items_embed_text(dataset: Path = typer.Argument(..., help="A prepared dataset directory."),
                     batch_size: int = typer.Option(128, help="Texts per forward pass."),
                     device: str = typer.Option("cpu", help="cpu or cuda.")):
    """Compute 384-d all-MiniLM-L6-v2 content vectors from item text and store them in the dataset."""
    from pinnerformer.features.text import embed_items_text

    run_guarded(lambda: embed_items_text(dataset, batch_size=batch_size, device=device,
                                         log=lambda s: err_console.print(s, highlight=False)))


@app.command("train")
def train(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="A prepared dataset directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory (checkpoints, metrics, config)."),
    preset: str = typer.Option("small", help="small | loo | paper (loo: the leave-one-out default)"),
    objective: Optional[str] = typer.Option(None, help="dense-all-action | all-action | sasrec | next-action"),
    negatives: Optional[str] = typer.Option(None, help="mixed | in-batch | random | full (softmax over every item)"),
    no_logq: bool = typer.Option(False, "--no-logq", help="Turn the logQ correction off."),
    config: Optional[Path] = typer.Option(None, help="JSON file overriding preset values (unknown keys are errors)."),
    protocol: Optional[str] = typer.Option(None, help="auto | future-window | leave-one-out (validation)."),
    max_epochs: Optional[int] = typer.Option(None, help="Override optim.max_epochs."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps (then validate)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    seed: Optional[int] = typer.Option(None, help="Override the seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train a PinnerFormer user tower (and item tower) with early stopping on validation data."""

    def body():
        from pinnerformer.data.dataset import Dataset
        from pinnerformer.objectives.examples import OBJECTIVES
        from pinnerformer.objectives.sampled_softmax import NEGATIVES
        from pinnerformer.training.config import load_config
        from pinnerformer.training.trainer import Trainer

        if objective is not None and objective not in OBJECTIVES:
            raise PinnerformerError(f"unknown objective '{objective}': expected one of {', '.join(OBJECTIVES)}")
        if negatives is not None and negatives not in NEGATIVES:
            raise PinnerformerError(f"unknown negatives '{negatives}': expected one of {', '.join(NEGATIVES)}")
        over: dict = {"loss": {}, "optim": {}, "eval": {}}
        if objective:
            over["loss"]["objective"] = objective
        if negatives:
            over["loss"]["negatives"] = negatives
        if no_logq:
            over["loss"]["logq"] = False
        if max_epochs is not None:
            over["optim"]["max_epochs"] = max_epochs
        if protocol:
            over["eval"]["protocol"] = protocol
        if device:
            over["device"] = device
        if seed is not None:
            over["seed"] = seed
        cfg = load_config(preset, config, over)
        trainer = Trainer(Dataset.open(dataset), cfg, output, log=lambda s: err_console.print(s, highlight=False))
        summary = trainer.fit(resume=resume, max_steps=max_steps, progress=progress)
        console.print_json(data=summary)

    run_guarded(body)


@app.command("evaluate")
def evaluate(
    run: Path = typer.Option(..., "--run", "-r", help="A training run directory."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    protocol: Optional[str] = typer.Option(None, help="future-window | leave-one-out (default: the run's)."),
    split: str = typer.Option("test", help="test | validation users."),
    cutoff: Optional[str] = typer.Option(None, help="future-window cut-off day(s), YYYY-MM-DD[,YYYY-MM-DD…] "
                                         "(pooled; default: the day with the most eligible users)."),
    label_days: float = typer.Option(14.0, help="future-window label horizon in days."),
    k: int = typer.Option(10, help="Cut-off rank k."),
    index_size: Optional[int] = typer.Option(None, help="Rank against a random pool of N items (default: all)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    frequency: Optional[str] = typer.Option(None, help="future-window: once,daily,realtime (comma list) — recall "
                                            "when the embedding is refreshed at that rate; reports realtime→daily."),
):
    """Score a trained run on held-out users beside baselines; writes JSON and Markdown into RUN/eval/."""

    def body():
        from pinnerformer.data.dataset import Dataset
        from pinnerformer.evaluation.evaluate import evaluate_run, markdown, parse_cutoffs, write_report

        if protocol not in (None, "future-window", "leave-one-out"):
            raise PinnerformerError(f"unknown protocol '{protocol}': expected future-window or leave-one-out")
        if label_days <= 0:
            raise PinnerformerError(f"--label-days must be positive, got {label_days}")
        if split not in ("test", "validation"):
            raise PinnerformerError(f"unknown split '{split}': expected test or validation")
        ds = Dataset.open(dataset)
        report = evaluate_run(run, ds, protocol, split, parse_cutoffs(cutoff, ds), label_days, k, index_size,
                              checkpoint, frequencies=[f.strip() for f in frequency.split(",")] if frequency else None,
                              log=lambda s: err_console.print(s, highlight=False))
        js, md = write_report(report, run)
        print(markdown(report))
        err_console.print(f"wrote {js} and {md} ({report['wall_s']} s)", highlight=False)

    run_guarded(body)


@app.command("experiment")
def experiment(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="A prepared dataset directory."),
    grid: str = typer.Option(..., help="objectives | negatives | features | frequency | default (one variant: the preset and config as given)"),
    output: Path = typer.Option(..., "--output", "-o", help="Report directory (runs, report.md, results.json, PNG)."),
    preset: str = typer.Option("small", help="small | loo | paper"),
    config: Optional[Path] = typer.Option(None, help="JSON config shared by every variant."),
    max_epochs: Optional[int] = typer.Option(None, help="Epoch budget for every variant."),
    seed: int = typer.Option(0, help="Seed shared by every variant."),
    cutoff: Optional[str] = typer.Option(None, help="future-window cut-off day(s) YYYY-MM-DD[,…], pooled (default: "
                                         "the day with the most eligible users)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Train and evaluate every variant of one ablation grid; write a Markdown table and PNG plots."""

    def body():

        from pinnerformer.evaluation.experiment import run_experiment

        cmd = " ".join(["pinnerformer experiment", "--dataset", str(dataset), "--grid", grid, "--output", str(output),
                        "--preset", preset] + (["--config", str(config)] if config else [])
                       + (["--max-epochs", str(max_epochs)] if max_epochs else []) + ["--seed", str(seed)]
                       + (["--cutoff", cutoff] if cutoff else []))
        run_experiment(dataset, grid, output, preset, config, max_epochs, seed, progress, command=cmd,
                       log=lambda s: err_console.print(s, highlight=False), cutoffs=cutoff)
        print((output / "report.md").read_text())

    run_guarded(body)


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
    shard_users: int = typer.Option(4096, help="Users per shard: the unit of work and of restart."),
    batch_size: int = typer.Option(256, help="Users per model batch."),
    device: str = typer.Option("cpu", help="local engine: cpu | cuda | auto (cuda runs in bf16)."),
    compile_model: bool = typer.Option(False, "--compile", help="local engine: torch.compile the transformer (faster on "
                                 "GPU; vectors differ from eager ones in the last bits, so the first compiled day "
                                 "recomputes everyone)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    force: bool = typer.Option(False, help="Recompute a day that already has a complete snapshot."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Daily batch inference: user embeddings as of a day, incremental over the previous snapshot."""

    def body():
        from pinnerformer.data.dataset import Dataset
        from pinnerformer.inference.daily_embed import DailyJob
        from pinnerformer.inference.snapshot import parse_day

        if shard_users < 1 or batch_size < 1:
            raise PinnerformerError("--shard-users and --batch-size must be at least 1")
        job = DailyJob(run, Dataset.open(dataset), parse_day(as_of), output, dtype=dtype, checkpoint=checkpoint,
                       shard_users=shard_users, batch_size=batch_size, device=device,
                       compile=compile_model)
        job.run(engine=engine, force=force, ray_address=ray_address, ray_actors=ray_actors,
                ray_cpus_per_actor=ray_cpus_per_actor, log=lambda s: err_console.print(s, highlight=False),
                progress=progress)

    run_guarded(body)


@app.command("simulate-daily")
def simulate_daily(
    run: Path = typer.Option(..., "--run", "-r", help="A future-window training run directory."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    first: str = typer.Option(..., "--from", help="First day, YYYY-MM-DD."),
    last: str = typer.Option(..., "--to", help="Last day, YYYY-MM-DD."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where snapshots and the report go "
                                          "(default: RUN/simulate-daily)."),
    k: int = typer.Option(10, help="Recall cut-off rank."),
    label_days: float = typer.Option(14.0, help="Label horizon in days."),
    snapshots: Optional[Path] = typer.Option(None, help="Snapshot root (default: OUTPUT/snapshots)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Replay the daily job day by day; report users recomputed and Recall@k of the snapshot in use."""

    def body():
        from pinnerformer.data.dataset import Dataset
        from pinnerformer.inference.simulate import simulate_daily as simulate
        from pinnerformer.inference.snapshot import parse_day

        out = output or run / "simulate-daily"
        cmd = (f"pinnerformer simulate-daily --run {run} --dataset {dataset} --from {first} --to {last} --output {out}"
               + (f" --snapshots {snapshots}" if snapshots else ""))
        r = simulate(run, Dataset.open(dataset), parse_day(first), parse_day(last), out, k, label_days,
                     log=lambda s: err_console.print(s, highlight=False), progress=progress, command=cmd,
                     snapshots=snapshots)
        from pinnerformer.inference.simulate import markdown

        print(markdown(r))

    run_guarded(body)


def _parse_params(text: Optional[str]) -> dict:
    """'M=32,ef_search=64' -> {'M': 32, 'ef_search': 64}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PinnerformerError(f"--params: {part!r} is not KEY=VALUE")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise PinnerformerError(f"--params: {key.strip()} must be an integer, got {value!r}") from None
    return out


@app.command("index")
def index(
    run: Path = typer.Option(..., "--run", "-r", help="A training run directory."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    output: Path = typer.Option(..., "--output", "-o", help="Index directory to write."),
    kind: str = typer.Option("hnsw", help="hnsw | flat | ivf"),
    params: Optional[str] = typer.Option(None, help="hnsw: M,ef_construction,ef_search; ivf: nlist,nprobe "
                                         "(e.g. 'M=32,ef_search=128')."),
    checkpoint: str = typer.Option("best", help="best | last"),
):
    """Item embeddings from the item tower into a FAISS index, with its id map and manifest."""

    def body():
        from pinnerformer.data.dataset import Dataset
        from pinnerformer.retrieval.index import build_item_index

        build_item_index(run, Dataset.open(dataset), output, kind, _parse_params(params), checkpoint,
                         log=lambda s: err_console.print(s, highlight=False))

    run_guarded(body)


@app.command("retrieve")
def retrieve(
    index: Path = typer.Option(..., "--index", help="An item index directory (`pinnerformer index`)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="A snapshot day directory (`pinnerformer embed`)."),
    user: Optional[str] = typer.Option(None, "--user", help="One user id: print their top-k."),
    item: Optional[str] = typer.Option(None, "--item", help="One item id: print the k most similar items."),
    users_file: Optional[Path] = typer.Option(None, "--users-file", help="Batch: a text file of user ids, one per "
                                              "line (default with --output: every user in the snapshot)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Batch: Parquet file of (user, rank, item)."),
    k: int = typer.Option(10, "-k", help="How many items."),
):
    """Top-k items for a user (or similar items for an item) from the index; a batch form writes Parquet."""

    def body():
        from pinnerformer.inference.snapshot import Snapshot
        from pinnerformer.retrieval.index import ItemIndex
        from pinnerformer.retrieval.retrieve import similar_items, top_k_batch, top_k_for_user

        if k < 1:
            raise PinnerformerError(f"-k must be at least 1, got {k}")
        modes = sum(x is not None for x in (user, item, output))
        if modes != 1:
            raise PinnerformerError("give exactly one of --user ID, --item ID or --output FILE (batch)")
        idx = ItemIndex.open(index)
        if item is not None:
            frame, title = similar_items(idx, item, k), f"items similar to item {item}"
        else:
            if snapshot is None:
                raise PinnerformerError("--snapshot is required for user retrieval")
            snap = Snapshot.open(snapshot)
            if output is not None:
                ids = None
                if users_file is not None:
                    if not users_file.exists():
                        raise PinnerformerError(f"{users_file}: users file not found")
                    ids = [line.strip() for line in users_file.read_text().splitlines() if line.strip()]
                info = top_k_batch(idx, snap, ids, k, output)
                err_console.print(f"wrote {info['output']}: top-{k} for {info['users']:,} users "
                                  f"({info['rows']:,} rows)", highlight=False)
                return
            frame, title = top_k_for_user(idx, snap, user, k), f"top {k} for user {user} (as of {snap.manifest['as_of']})"
        table = Table(title=title)
        for col in frame.columns:
            table.add_column(col, overflow="fold")
        for row in frame.iter_rows():
            table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)

    run_guarded(body)


@app.command("quickstart")
def quickstart(workdir: Path = typer.Option(Path("quickstart-run"), help="Where outputs go."),
               text: bool = typer.Option(True, help="Embed item text (needs the [text] extra)."),
               train: bool = typer.Option(True, help="Train a model on the prepared data."),
               max_epochs: int = typer.Option(10, help="Training epochs at most (early stopping may end sooner).")):
    """The main job, end to end, on the built-in MovieLens latest-small data."""
    from pinnerformer.quickstart import run_quickstart

    run_guarded(lambda: run_quickstart(workdir, text=text, log=lambda s: err_console.print(s, highlight=False),
                                       show=print_stats, train=train, max_epochs=max_epochs))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
