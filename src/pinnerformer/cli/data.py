"""`pinnerformer data prepare | stats` and `pinnerformer items embed-text`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pinnerformer.cli.common import app, console, data_app, items_app, log, parse_list, run_guarded
from pinnerformer.errors import PinnerformerError

# which --options apply to which --format (an option given for another format is an error, never ignored)
APPLIES = {
    "rating-rule": {"movielens", "movielens-latest"},
    "positive": {"movielens", "movielens-latest", "otto", "events", "taobao", "mind"},
    "actions": {"sequences", "events"},
    "id-type": {"sequences", "events"},
    "item-attributes": {"sequences"},
    **{f"{c}-col": {"events"} for c in ("user", "item", "time", "action", "surface", "duration")},
    **{k: {"events"} for k in ("time-format", "separator", "items", "items-id-col", "items-text-col",
                               "items-interests-col")},
}


def format_options(fmt: str, given: dict[str, object]) -> dict:
    """The format's options (see `data.formats`) from the command-line options that were given."""
    from pinnerformer.data.formats import FORMATS

    for flag in given:
        if fmt in FORMATS and fmt not in APPLIES[flag]:
            raise PinnerformerError(f"--{flag} does not apply to --format {fmt} (it is for "
                                    f"{' and '.join(sorted(APPLIES[flag]))})")
    g = given.get
    if fmt in ("movielens", "movielens-latest"):
        return {k: v for k, v in {"rating_rule": g("rating-rule"), "positive": parse_list(g("positive"))}.items()
                if v is not None}
    if fmt == "sequences":
        actions = parse_list(g("actions")) or []
        if len(actions) > 1:
            raise PinnerformerError("--actions: the sequences format has one action type; give one name")
        return {k: v for k, v in {"action": actions[0] if actions else None, "id_type": g("id-type"),
                                  "item_attributes": g("item-attributes")}.items() if v is not None}
    if fmt in ("otto", "taobao", "mind"):
        return {"positive": parse_list(g("positive"))} if "positive" in given else {}
    if fmt == "events":
        sep = g("separator")
        columns = {c: g(f"{c}-col") for c in ("user", "item", "time", "action", "surface", "duration")}
        items = {"item": g("items-id-col"), "text": g("items-text-col"), "interests": g("items-interests-col")}
        out = {"columns": {k: v for k, v in columns.items() if v is not None},
               "item_columns": {k: v for k, v in items.items() if v is not None},
               "time_format": g("time-format"), "positive": parse_list(g("positive")),
               "actions": parse_list(g("actions")) or None, "id_type": g("id-type"), "items": g("items"),
               "separator": "\t" if sep in ("\\t", "tab") else sep}
        return {k: v for k, v in out.items() if v is not None}
    return {}


# The options of the input formats, shared by `data prepare` and `data append`: (flag, type, help)
FORMAT_FLAGS = [
    ("rating-rule", str, "MovieLens rating -> action, e.g. '5=love,4-4.5=like,3-3.5=neutral,0.5-2.5=dislike' (the "
                         "default)."),
    ("positive", str, "Comma-separated positive action types (MovieLens default: love,like; otto: clicks,carts,"
                      "orders)."),
    ("actions", str, "events: the allowed action values (others are errors); sequences: the name of the single "
                     "action (default interact)."),
    ("user-col", str, "events: user id column (default user)."),
    ("item-col", str, "events: item id column (default item)."),
    ("time-col", str, "events: time column (default timestamp)."),
    ("action-col", str, "events: action type column (default: none, one action)."),
    ("surface-col", str, "events: surface column."),
    ("duration-col", str, "events: duration column (seconds)."),
    ("time-format", str, "events: unix (default) | unix-ms | iso | order | a strftime pattern."),
    ("separator", str, "events: CSV field separator (default ',')."),
    ("id-type", str, "events/sequences: auto (default) | int | str."),
    ("items", Path, "events: item table (CSV or Parquet)."),
    ("items-id-col", str, "events: item id column of the item table (default item)."),
    ("items-text-col", str, "events: item text column."),
    ("items-interests-col", str, "events: item interests column ('|'-separated)."),
    ("item-attributes", Path, "sequences: item -> attributes JSON (default: FILE-STEM_item2attributes.json, or a plain "
                              "item2attributes.json, beside the input)."),
]


# What reading any input takes besides the format's options: (name, type, default, flag, help)
READ_FLAGS = [
    ("skip_invalid", bool, False, "--skip-invalid", "Skip malformed rows and count them (default: stop at the first)."),
    ("min_time", str, "1990-01-01", "--min-time", "Earliest sane timestamp (YYYY-MM-DD, UTC)."),
    ("max_time", Optional[str], None, "--max-time", "Latest sane timestamp (default: tomorrow)."),
    ("as_json", bool, False, "--json", "Print the dataset summary as JSON."),
]


def with_format_flags(fn):
    """Adds the reading options (READ_FLAGS) and the format options (FORMAT_FLAGS) to a command's signature; the
    command gets them in **flags (`read_input` takes them from there)."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    kw = inspect.Parameter.KEYWORD_ONLY
    extra = [inspect.Parameter(name, kw, annotation=kind, default=typer.Option(default, flag, help=text))
             for name, kind, default, flag, text in READ_FLAGS]
    extra += [inspect.Parameter(flag.replace("-", "_"), kw, annotation=Optional[kind],
                                default=typer.Option(None, f"--{flag}", help=text)) for flag, kind, text in FORMAT_FLAGS]
    fn.__signature__ = sig.replace(parameters=own + extra)
    return fn


def reading_options(format: str, flags: dict) -> tuple[dict, dict]:
    """The command's flags as (skip_invalid, min_time, max_time as days) and the format's own options."""
    from pinnerformer.data.clock import parse_day

    read = {"skip_invalid": flags["skip_invalid"], "min_time": parse_day(flags["min_time"], "--min-time"),
            "max_time": parse_day(flags["max_time"], "--max-time") if flags["max_time"] else None}
    given = {name.replace("_", "-"): v for name, v in flags.items()
             if v is not None and name not in {n for n, *_ in READ_FLAGS}}
    return read, format_options(format, given)


def read_input(format: str, input: Path, flags: dict):
    """The input read with the command's flags: (raw log, skip_invalid, min_time, max_time) for append and daily."""
    from pinnerformer.data.clock import day_start_ts
    from pinnerformer.data.formats import read_source

    read, options = reading_options(format, flags)
    raw = read_source(format, input, options, skip_invalid=read["skip_invalid"])
    hi = day_start_ts(read["max_time"]) if read["max_time"] else None
    return raw, read["skip_invalid"], day_start_ts(read["min_time"]), hi


FORMAT_HELP = "movielens | movielens-latest | sequences | otto | events | taobao | mind"


@data_app.command("prepare")
@with_format_flags
def data_prepare(
    format: str = typer.Option(..., "--format", "-f", help=FORMAT_HELP),
    input: Path = typer.Option(..., "--input", "-i", help="Source file or folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset directory to write."),
    overwrite: bool = typer.Option(False, help="Replace an existing dataset directory."),
    **flags,
):
    """Turn a source event log into a canonical dataset directory (events, items, timelines, manifest)."""

    def body():
        from pinnerformer.api import prepare_dataset

        read, options = reading_options(format, flags)
        print_stats(prepare_dataset(input, output, format, overwrite=overwrite, log=log, **read, **options),
                    flags["as_json"])

    run_guarded(body)


@data_app.command("append")
@with_format_flags
def data_append(
    dataset: Path = typer.Argument(..., help="A prepared dataset directory, to grow."),
    format: str = typer.Option(..., "--format", "-f", help=FORMAT_HELP),
    input: Path = typer.Option(..., "--input", "-i", help="The new period's events (file or folder)."),
    allow_late: bool = typer.Option(False, "--allow-late", help="Keep events older than the dataset's end (counted; "
                                    "the next embed recomputes every user)."),
    **flags,
):
    """Add a new period's events to a dataset: ids keep their indexes, the manifest records the lineage."""
    from pinnerformer.data.append import append

    def body():
        if flags.get("positive") is not None:
            raise PinnerformerError("--positive: on append the dataset's positive actions apply (they are part of "
                                    "what a model trained on it learned)")
        raw, skip_invalid, lo, hi = read_input(format, input, as_in_dataset(format, dataset, flags))
        append(dataset, raw, skip_invalid=skip_invalid, allow_late=allow_late, min_time=lo, max_time=hi,
               vectorize=text_vectorizer(dataset), log=log, on_written=lambda ds: print_stats(ds, flags["as_json"]))

    run_guarded(body)


def as_in_dataset(format: str, dataset: Path, flags: dict) -> dict:
    """New events are read as the dataset's were: in its format, with its action vocabulary (its positive actions,
    and, for events with an action column, its action types as the allowed ones, so that an unknown action is named
    as such)."""
    from pinnerformer.data.dataset import Dataset

    m = Dataset.open(dataset).manifest
    if format != m.format:
        raise PinnerformerError(f"--format {format}: {dataset} was prepared from format {m.format}; new events must be "
                                f"read the same way (expected --format {m.format})")
    actions = m.actions
    flags = dict(flags)
    if format in APPLIES["positive"]:
        flags["positive"] = ",".join(a.name for a in actions if a.positive)
    if format == "events" and flags.get("action_col") and flags.get("actions") is None:
        flags["actions"] = ",".join(a.name for a in actions)
    if format == "events" and flags.get("id_type") is None:  # "0008" stays a string in a string-keyed dataset
        # Read before this command's append takes the lock, so another append may swap the folder meanwhile: any
        # whole version will do, since appends keep the id types.
        integer = Dataset.read_stable(dataset, lambda ds: ds.users["user_id"].dtype.is_integer()
                                      and ds.items["item_id"].dtype.is_integer())
        flags["id_type"] = "int" if integer else "str"
    return flags


def text_vectorizer(dataset: Path):
    """The item-text encoder when the dataset has content vectors (new items need theirs), else None."""
    from pinnerformer.data.dataset import Dataset

    if Dataset.open(dataset).manifest.content_vectors is None:
        return None
    from pinnerformer.features.text import TextEncoder

    return lambda texts: TextEncoder().encode(texts, progress=False)


@data_app.command("stats")
def data_stats(dataset: Path = typer.Argument(..., help="A prepared dataset directory."),
               as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """Users, items, events per action type, time range, events per user, positives share, fingerprint."""
    from pinnerformer.data.dataset import Dataset

    run_guarded(lambda: Dataset.read_stable(dataset, lambda ds: print_stats(ds, as_json)))


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

    run_guarded(lambda: embed_items_text(dataset, batch_size=batch_size, device=device, log=log))


@app.command("daily")
@with_format_flags
def daily(
    workdir: Optional[Path] = typer.Option(None, "--workdir", "-w", help="A work directory laid out as the "
                                           "quickstart's (run/, dataset/, snapshots/, index/, store/): the defaults "
                                           "of --run, --dataset, --snapshot-root, --index and, without --input, "
                                           "--from-store."),
    run: Optional[Path] = typer.Option(None, "--run", "-r", help="A training run directory."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="The dataset the run was trained on (or "
                                           "grown from it)."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="The new period's events (a file or folder)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help=FORMAT_HELP + " (with --input)"),
    from_store: Optional[str] = typer.Option(None, "--from-store", help="Take the new events from the online "
                                             "service's event log instead of a file: redis://HOST:PORT/DB or an "
                                             "LMDB directory (the service's --store)."),
    until: Optional[str] = typer.Option(None, "--until", help="With --from-store: take the events before this UTC "
                                        "day, YYYY-MM-DD (default: today: complete days only)."),
    snapshot_root: Optional[Path] = typer.Option(None, "--snapshot-root", help="Where the daily snapshots go "
                                                 "(ROOT/DAY/)."),
    index: Optional[Path] = typer.Option(None, "--index", help="The item index directory, rebuilt when items or "
                                         "model change."),
    allow_late: bool = typer.Option(False, "--allow-late", help="Keep events older than the dataset's end (--input; "
                                    "the event log's late events are always kept: they were acknowledged)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    progress: bool = typer.Option(True, help="Show progress bars."),
    **flags,
):
    """The daily loop in one command: append the new events (a file, or the service's event log), embed the new day
    incrementally, refresh the index. A service over the same work directory serves the new day after
    POST /v1/admin/reload (or by itself with `serve --watch-seconds`)."""
    from pinnerformer.daily import run_daily, run_daily_from_store

    def need(value, name: str, default: str):
        if value is not None:
            return value
        if workdir is None:
            raise PinnerformerError(f"{name} is required (or --workdir, whose {default} it then is)")
        return workdir / default

    def body():
        from pinnerformer.data.clock import parse_day

        run_dir, ds_dir = need(run, "--run", "run"), need(dataset, "--dataset", "dataset")
        snaps, index_dir = need(snapshot_root, "--snapshot-root", "snapshots"), need(index, "--index", "index")
        if input is not None and from_store is not None:
            raise PinnerformerError("--input and --from-store both given: take the new events from one of them")
        if input is not None:
            if format is None:
                raise PinnerformerError("--input needs --format (" + FORMAT_HELP + ")")
            if until is not None:
                raise PinnerformerError("--until applies to --from-store only (--input takes --max-time)")
            raw, skip_invalid, lo, hi = read_input(format, input, as_in_dataset(format, ds_dir, flags))
            report = run_daily(run_dir, ds_dir, raw, snaps, index_dir, allow_late=allow_late,
                               skip_invalid=skip_invalid, min_time=lo, max_time=hi,
                               vectorize=text_vectorizer(ds_dir), checkpoint=checkpoint, log=log, progress=progress)
        else:
            store = from_store or (str(workdir / "store") if workdir is not None else None)
            if store is None:
                raise PinnerformerError("no new events named: give --input FILE --format F, or --from-store STORE "
                                        "(the service's event log), or --workdir (its store/)")
            if format is not None:
                raise PinnerformerError("--format applies to --input; the event log has its own")
            defaults = {name: default for name, _, default, *_ in READ_FLAGS}
            given = [f"--{n.replace('_', '-')}" for n, v in flags.items() if v is not None and v != defaults.get(n)]
            if given:
                raise PinnerformerError(f"{', '.join(given)}: reading options apply to --input; the event log is "
                                        "read as it was acknowledged (--until chooses its days)")
            report = run_daily_from_store(run_dir, ds_dir, store, snaps, index_dir,
                                          before=parse_day(until, "--until") if until else None,
                                          checkpoint=checkpoint, vectorize=text_vectorizer(ds_dir), log=log,
                                          progress=progress)
            if report is None:
                log("daily: no new events in the event log: nothing to do")
                return
        s = report.snapshot
        log(f"daily {report.day}: {'appended' if report.appended else 'already appended'}; snapshot {s.users:,} users "
            f"({s.recomputed:,} recomputed, {s.carried_over:,} carried over; unseen by the model: "
            f"{s.unseen.get('users', 0):,} users, {s.unseen.get('items', 0):,} items); index "
            f"{'rebuilt' if report.index_rebuilt else 'kept'} ({report.index_reason})")

    run_guarded(body)
