"""`pinnerformer data prepare | stats` and `pinnerformer items embed-text`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pinnerformer.cli.common import console, data_app, items_app, log, parse_list, run_guarded
from pinnerformer.errors import PinnerformerError

# which --options apply to which --format (an option given for another format is an error, never ignored)
APPLIES = {
    "rating-rule": {"movielens", "movielens-latest"},
    "positive": {"movielens", "movielens-latest", "otto", "events"},
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
    if fmt == "otto":
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
    user_col: Optional[str] = typer.Option(None, help="events: user id column (default user)."),
    item_col: Optional[str] = typer.Option(None, help="events: item id column (default item)."),
    time_col: Optional[str] = typer.Option(None, help="events: time column (default timestamp)."),
    action_col: Optional[str] = typer.Option(None, help="events: action type column (default: none, one action)."),
    surface_col: Optional[str] = typer.Option(None, help="events: surface column."),
    duration_col: Optional[str] = typer.Option(None, help="events: duration column (seconds)."),
    time_format: Optional[str] = typer.Option(None, help="events: unix (default) | unix-ms | iso | order | a "
                                              "strftime pattern."),
    separator: Optional[str] = typer.Option(None, help="events: CSV field separator (default ',')."),
    id_type: Optional[str] = typer.Option(None, help="events/sequences: auto (default) | int | str."),
    items: Optional[Path] = typer.Option(None, help="events: item table (CSV or Parquet)."),
    items_id_col: Optional[str] = typer.Option(None, help="events: item id column of the item table (default item)."),
    items_text_col: Optional[str] = typer.Option(None, help="events: item text column."),
    items_interests_col: Optional[str] = typer.Option(None, help="events: item interests column ('|'-separated)."),
    item_attributes: Optional[Path] = typer.Option(None, help="sequences: item -> attributes JSON "
                                                   "(default: a *item2attributes.json beside the input)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Turn a source event log into a canonical dataset directory (events, items, timelines, manifest)."""
    from pinnerformer.data.clock import day_start_ts, parse_day
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.data.formats import read_source
    from pinnerformer.data.prepare import prepare

    def body():
        given = {flag: v for flag, v in {
            "rating-rule": rating_rule, "positive": positive, "actions": actions, "user-col": user_col,
            "item-col": item_col, "time-col": time_col, "action-col": action_col, "surface-col": surface_col,
            "duration-col": duration_col, "time-format": time_format, "separator": separator, "id-type": id_type,
            "items": items, "items-id-col": items_id_col, "items-text-col": items_text_col,
            "items-interests-col": items_interests_col, "item-attributes": item_attributes}.items() if v is not None}
        raw = read_source(format, input, format_options(format, given), skip_invalid=skip_invalid)
        prepare(raw, output, format, skip_invalid=skip_invalid, min_time=day_start_ts(parse_day(min_time, "--min-time")),
                max_time=day_start_ts(parse_day(max_time, "--max-time")) if max_time else None, overwrite=overwrite,
                log=log)
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

    run_guarded(lambda: embed_items_text(dataset, batch_size=batch_size, device=device, log=log))
