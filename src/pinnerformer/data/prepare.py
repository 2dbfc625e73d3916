"""Raw log -> canonical dataset directory (see `schema.py`).

Steps: action codes, time sanity, deduplication, dense user/item indices, sort by (user, time), write.
Everything is written into a temporary sibling directory that is renamed into place at the very end, so an
interrupted run never leaves a directory that looks like a complete dataset.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import polars as pl

from pinnerformer.version import __version__
from pinnerformer.data import schema
from pinnerformer.data.clock import day_start_ts
from pinnerformer.data.formats.base import Checker, RawLog
from pinnerformer.data.timelines import NO_SURFACE, Timelines
from pinnerformer.errors import InputError, PinnerformerError
from pinnerformer.io import atomic_dir, file_sha256, write_json_atomic

DEFAULT_MIN_TIME = dt.date(1990, 1, 1)


def default_max_time() -> int:
    return int(time.time()) + 86400  # a clock a day fast is still sane; a year 2100 stamp is not


def fingerprint(timelines: Timelines, actions: list[schema.ActionType], users: pl.Series, items: pl.Series) -> str:
    """Content hash of what a model sees: events, action vocabulary and the id maps (not file bytes)."""
    h = timelines.content_hash()
    h.update(repr([(a.code, a.name, a.positive) for a in actions]).encode())
    for ids in (users, items):
        h.update(str(ids.dtype).encode())
        h.update(ids.cast(pl.String).str.join("\x1f").item().encode())
    return h.hexdigest()[:16]


def clean_events(raw: RawLog, vocab: list[str], checker: Checker, min_time: int | None, max_time: int | None
                 ) -> tuple[pl.DataFrame, str, int]:
    """Action codes (position in `vocab`), time sanity (real clocks), exact duplicates removed (counted), times in
    seconds. Returns (events, clock, duplicates removed)."""
    ev = raw.events
    if ev.height == 0:
        raise InputError("the input yields no events" + (f" (skipped: {raw.skipped})" if raw.skipped else ""),
                         path=", ".join(map(str, raw.sources)))
    ev = checker.check(ev, ~pl.col("action").is_in(vocab), reason="unknown_action", problem="unknown action value",
                       field="action", expected=f"one of {', '.join(vocab)}")
    ev = ev.with_columns(pl.col("action").replace_strict(vocab, list(range(len(vocab))), return_dtype=pl.Int16))
    # time sanity (real clocks only), judged in the source's unit so the error shows the value as written
    clock = "order" if raw.ts_unit == "order" else "seconds"
    if clock == "seconds":
        lo = day_start_ts(DEFAULT_MIN_TIME) if min_time is None else min_time
        hi = default_max_time() if max_time is None else max_time
        scale = 1000 if raw.ts_unit == "ms" else 1
        day = lambda s: dt.datetime.fromtimestamp(s, dt.timezone.utc).strftime("%Y-%m-%d")
        ev = checker.check(ev, ~pl.col("ts").is_between(lo * scale, hi * scale), reason="time_out_of_range",
                           problem="timestamp outside the sane range", field="ts",
                           expected=f"a time between {day(lo)} and {day(hi)} "
                                    f"(Unix {'milliseconds' if scale == 1000 else 'seconds'}; --min-time/--max-time)")
    if ev.height == 0:
        raise InputError(f"the input yields no events: everything was skipped ({raw.skipped})",
                         path=", ".join(map(str, raw.sources)))
    # deduplicate identical events (same user, item, action, time and source detail), keep the first
    n_before = ev.height
    ev = ev.unique(subset=["user", "item", "action", "ts", "detail"], keep="first", maintain_order=True)
    duplicates = n_before - ev.height
    if raw.ts_unit == "ms":
        ev = ev.with_columns(pl.col("ts") // 1000)
    return ev, clock, duplicates


def encode_ids(ev: pl.DataFrame, users: pl.Series, items: pl.Series, surfaces: list[str]) -> pl.DataFrame:
    """Source ids -> dense indices (position in the id maps), surface names -> codes, sorted by (user, time) with
    ties in input order."""
    ev = ev.with_columns(
        pl.col("user").replace_strict(users, pl.int_range(users.len(), eager=True), return_dtype=pl.Int32),
        pl.col("item").replace_strict(items, pl.int_range(items.len(), eager=True), return_dtype=pl.Int32),
        pl.col("surface").replace_strict(surfaces, list(range(len(surfaces))), default=None, return_dtype=pl.Int16),
        pl.col("duration").cast(pl.Float32))
    return ev.sort(["user", "ts"], maintain_order=True).drop("_file", "_line")


def item_rows(raw: RawLog, index_from: int, ids: pl.Series) -> tuple[pl.DataFrame, int, int]:
    """Item table rows for the items `ids` (indices from `index_from`), with the input's text and interests.
    Returns (rows, items without a metadata row, metadata rows whose item has no event)."""
    meta = raw.items.unique(subset=["item"], keep="first", maintain_order=True)
    if meta.height != raw.items.height:
        raise InputError(f"{raw.items.height - meta.height} item id(s) appear more than once in the item table",
                         path=", ".join(map(str, raw.sources[1:])) or None)
    rows = (pl.DataFrame({"item": pl.int_range(index_from, index_from + ids.len(), eager=True, dtype=pl.Int32),
                          "item_id": ids})
            .join(meta.rename({"item": "item_id"}), on="item_id", how="left", maintain_order="left")
            .with_columns(pl.col("interests").fill_null(pl.lit([], pl.List(pl.String)))))
    n_no_meta = rows.height - int(ids.is_in(meta["item"].implode()).sum())
    return rows, n_no_meta if meta.height else 0, meta.height - int(meta["item"].is_in(ids.implode()).sum())


def build_timelines(ev: pl.DataFrame, n_users: int, clock: str) -> Timelines:
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(ev["user"].to_numpy(), minlength=n_users), out=offsets[1:])
    return Timelines(
        offsets=offsets, item=ev["item"].to_numpy(), action=ev["action"].to_numpy(), ts=ev["ts"].to_numpy(),
        surface=ev["surface"].fill_null(NO_SURFACE).to_numpy(), duration=ev["duration"].fill_null(np.nan).to_numpy(),
        clock=clock)


def source_files(paths: list[Path]) -> list[schema.SourceFile]:
    return [schema.SourceFile(path=str(p.resolve()), bytes=p.stat().st_size, sha256=file_sha256(p)) for p in paths]


def write_dataset(output: Path, ev: pl.DataFrame, user_table: pl.DataFrame, item_table: pl.DataFrame,
                  timelines: Timelines, manifest: schema.Manifest) -> None:
    """Everything under a temporary name, then swapped in: never a directory that looks complete but is not."""
    with atomic_dir(output) as tmp:
        ev.write_parquet(tmp / schema.EVENTS, statistics=True)
        user_table.write_parquet(tmp / schema.USERS)
        item_table.write_parquet(tmp / schema.ITEMS)
        timelines.save(tmp / schema.TIMELINES)
        write_json_atomic(tmp / schema.MANIFEST, manifest)


def prepare(raw: RawLog, output: Path, fmt: str, *, skip_invalid: bool = False, min_time: int | None = None,
            max_time: int | None = None, overwrite: bool = False, log=print) -> schema.Manifest:
    t0 = time.perf_counter()
    output = Path(output)
    if output.is_symlink():
        raise PinnerformerError(f"{output} is a symbolic link (to {output.readlink()}): refusing to write through it; "
                                "give the real path")
    if output.exists():
        if not overwrite:
            raise PinnerformerError(f"{output} already exists (use --overwrite to replace it)")
        if output.is_file() or (any(output.iterdir()) and not (output / schema.MANIFEST).exists()):
            raise PinnerformerError(f"{output} exists and is not a prepared dataset: refusing to replace it")
    checker = Checker(skip_invalid, raw.skipped, raw.line_label)
    vocab = list(raw.actions)
    if not raw.positive:
        raise InputError("no positive action types", field="positive", expected=f"some of {', '.join(vocab)}")
    bad_pos = [p for p in raw.positive if p not in vocab]
    if bad_pos:
        raise InputError(f"positive action(s) {', '.join(bad_pos)} are not action types of this input",
                         field="positive", expected=f"some of {', '.join(vocab)}")
    ev, clock, duplicates = clean_events(raw, vocab, checker, min_time, max_time)

    # dense indices, in sorted source-id order
    users = ev["user"].unique().sort()
    items = ev["item"].unique().sort()
    surfaces = sorted(ev["surface"].drop_nulls().unique().to_list())
    ev = encode_ids(ev, users, items, surfaces)

    # item table: every item with events; metadata rows without events are counted, not kept
    item_table, n_no_meta, n_catalogue_only = item_rows(raw, 0, items)
    notes = list(raw.notes)
    if n_no_meta:
        notes.append(f"{n_no_meta} item(s) with events have no row in the item table (no text, no interests)")
    skipped = dict(raw.skipped)
    if n_catalogue_only:
        skipped["catalogue_items_without_events"] = n_catalogue_only
    user_table = pl.DataFrame({"user": pl.int_range(users.len(), eager=True, dtype=pl.Int32), "user_id": users})

    timelines = build_timelines(ev, users.len(), clock)
    action_types = [schema.ActionType(code=i, name=a, positive=a in raw.positive) for i, a in enumerate(vocab)]
    counts = np.bincount(timelines.action, minlength=len(vocab))
    manifest = schema.Manifest(
        pinnerformer_version=__version__, format=fmt, clock=clock,
        n_events=ev.height, n_users=users.len(), n_items=items.len(), actions=action_types, surfaces=surfaces,
        events_per_action={a: int(c) for a, c in zip(vocab, counts)},
        time_min=int(timelines.ts.min()), time_max=int(timelines.ts.max()),
        has_surface=bool(surfaces), has_duration=bool(ev["duration"].is_not_null().any()),
        sources=source_files(raw.sources),
        options={**raw.options, "positive": list(raw.positive), "skip_invalid": skip_invalid},
        skipped=skipped, duplicates_removed=duplicates, notes=notes,
        fingerprint=fingerprint(timelines, action_types, users, items),
    )
    write_dataset(output, ev, user_table, item_table, timelines, manifest)
    log(f"prepared {manifest.n_events:,} events in {time.perf_counter() - t0:.1f}s -> {output}")
    return manifest
