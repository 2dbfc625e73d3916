"""The service's event log and its export for the daily job: the loop events -> dataset -> snapshot -> service.

Every event `POST /v1/events` acknowledges is written, in the same store transaction as the user's realtime list,
to an append-only log partitioned by the event's UTC day (`OnlineStore.append(log=...)`). An entry is one batch's
events of one day, as JSON with the ids as the client gave them:

    {"received": 1764892800, "client": "default", "batch_id": "b-17",
     "events": [["user", "item", "action", time, "surface" | null, duration | null], ...]}

The realtime list keeps only a user's newest events; the log keeps them all, so the daily job can grow the dataset
from it (`pinnerformer daily --from-store`): `export_log` writes the log's entries of every complete day not yet
exported as one Parquet file in the `events` format (under the dataset's folder, `event-log/`), which is appended
like any other input; `commit_export` then moves the per-day cursors past them. Each step can be killed and run
again: a file already appended is recognised by its SHA-256 and events already in the dataset are removed as exact
duplicates (counted), so a re-run never appends twice, and the cursors only move after the append succeeded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import polars as pl

from pinnerformer.config import StrictModel
from pinnerformer.data.formats.events import EventColumns, EventsOptions
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import atomic_path, write_json_atomic
from pinnerformer.serving.store import OnlineStore

CURSORS = "cursors.json"
COLUMNS = {"user": pl.String, "item": pl.String, "action": pl.String, "time": pl.Int64, "surface": pl.String,
           "duration": pl.Float64}


class LogEntry(StrictModel):
    received: int
    client: str
    batch_id: str | None
    events: list[tuple[str, str, str, int, str | None, float | None]]


def utc_day(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).date().isoformat()


def log_entries(rows: list[tuple[str, str, str, int, str | None, float | None]], received: int, client: str,
                batch_id: str | None) -> dict[str, bytes]:
    """One batch's events as log entries, {UTC day of the event: entry}; arrival order is kept within a day."""
    by_day: dict[str, list] = {}
    for row in rows:
        by_day.setdefault(utc_day(row[3]), []).append(list(row))
    return {day: json.dumps({"received": received, "client": client, "batch_id": batch_id, "events": ev},
                            separators=(",", ":")).encode() for day, ev in by_day.items()}


class LogExport(StrictModel):
    """What one export took from the log: the file (None when nothing was new), its events and the cursors (per
    day, the last entry id exported) to commit once the file is appended."""

    store: str
    before: str  # days before this one were taken (complete days)
    path: Path | None
    events: int
    entries: int
    days: list[str]
    cursors: dict[str, str]


def events_options(actions: list[str], positive: list[str], id_type: str) -> EventsOptions:
    """How an export file is read back (the `events` format, the dataset's action vocabulary and id type: ids that
    look like numbers stay strings in a string-keyed dataset, "0042" never becomes 42)."""
    return EventsOptions(columns=EventColumns(user="user", item="item", time="time", action="action",
                                              surface="surface", duration="duration"),
                         actions=actions, positive=positive, id_type=id_type)


def read_cursors(out_dir: Path, store: OnlineStore) -> dict[str, str]:
    path = out_dir / CURSORS
    if not path.exists():
        return {}
    try:
        stores = json.loads(path.read_text())["stores"]
        cursors = {str(day): str(c) for day, c in stores.get(store.url, {}).items()}
        for c in cursors.values():
            store.check_log_id(c)
        return cursors
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        raise PinnerformerError(f"{path}: not a cursor file of the event log export (damaged or truncated); it "
                                "says how far each log partition was exported: restore it, or remove it to export "
                                "the whole log again (events already in the dataset are then removed as duplicates)"
                                ) from None


def export_log(store: OnlineStore, out_dir: Path, before: dt.date, log=print) -> LogExport:
    """Write the log entries of the days before `before` that follow the committed cursors to one Parquet file in
    `out_dir` (named by what it holds); nothing is written when there is nothing new."""
    out_dir = Path(out_dir)
    cursors = read_cursors(out_dir, store)
    rows: list[list] = []
    taken: dict[str, str] = {}
    n_entries = 0
    for day in store.log_days():
        if day >= before.isoformat():
            continue
        for entry_id, blob in store.read_log(day, cursors.get(day)):
            try:
                entry = LogEntry.model_validate_json(blob)
            except ValueError as e:
                raise PinnerformerError(f"{store.url}: event log entry {day}/{entry_id} is damaged: {e}") from None
            rows += entry.events
            taken[day] = entry_id
            n_entries += 1
    new_cursors = {**cursors, **taken}
    if not rows:
        log(f"event log of {store.url}: nothing new before {before}")
        return LogExport(store=store.url, before=before.isoformat(), path=None, events=0, entries=0, days=[],
                         cursors=new_cursors)
    days = sorted(taken)
    frame = pl.DataFrame(rows, schema=COLUMNS, orient="row")
    name = hashlib.sha256(json.dumps([store.url, cursors, new_cursors], sort_keys=True).encode()).hexdigest()[:12]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"log-{days[0]}_{days[-1]}-{name}.parquet"
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
    log(f"event log of {store.url}: {len(rows):,} events in {n_entries:,} entries of {len(days)} day(s) "
        f"({days[0]} .. {days[-1]}) -> {path}")
    return LogExport(store=store.url, before=before.isoformat(), path=path, events=len(rows), entries=n_entries,
                     days=days, cursors=new_cursors)


def commit_export(out_dir: Path, export: LogExport) -> None:
    """Move the store's cursors past what `export` took (after its file was appended)."""
    path = Path(out_dir) / CURSORS
    stores = json.loads(path.read_text())["stores"] if path.exists() else {}
    stores[export.store] = export.cursors
    write_json_atomic(path, {"stores": stores})
