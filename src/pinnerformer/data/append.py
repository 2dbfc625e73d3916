"""`pinnerformer data append`: a new period's events added to a prepared dataset, which keeps growing.

The id maps are append-only: every existing user and item keeps its index, new ones get the next indexes (in
sorted source-id order, as `prepare` gives them), so a model trained on any earlier version of the dataset still
reads this one (`Manifest.descends_from`). The action vocabulary is the dataset's (an unknown action type is an
error, as in `prepare`); new surfaces are added after the known ones. Events older than the dataset's end are
refused unless `allow_late` (then kept and counted: they change days that may already have been embedded).
Exact duplicates, within the new events or of events already in the dataset, are removed and counted. When the
dataset has item content vectors, the new items get theirs from `vectorize` (their text; none: a zero vector,
counted) and the old ones keep theirs bit for bit. The manifest records the lineage: the parent's fingerprint,
what came in and when. The new version replaces the directory by renames, under a lock: atomic, like `prepare`.
Input whose every source file is already in the dataset (by SHA-256: in its preparation or an earlier append) is
recognised and does nothing; input with any new file is appended (its events already there are duplicates, removed
and counted), and `find_record` says which append brought a given set of files in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from pinnerformer.version import __version__
from pinnerformer.data import schema
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.formats.base import Checker, RawLog
from pinnerformer.data.prepare import (
    build_timelines, clean_events, encode_ids, fingerprint, item_rows, source_files, write_dataset,
)
from pinnerformer.errors import InputError, PinnerformerError
from pinnerformer.io import exclusive


def _extend(old: pl.Series, new: pl.Series, what: str, source: Path) -> pl.Series:
    """The id map with the ids of `new` it lacks added at the end (sorted); the dtypes must agree."""
    if new.dtype != old.dtype:
        cast = new.cast(old.dtype, strict=False)
        if cast.null_count() > new.null_count():
            raise InputError(f"{what} ids of the new events are {new.dtype}, the dataset's are {old.dtype}",
                             path=source, expected=f"{old.dtype} {what} ids, as in the dataset")
        new = cast
    fresh = new.unique().filter(~new.unique().is_in(old.implode())).sort()
    return pl.concat([old, fresh])


def find_record(manifest: schema.Manifest, sources: list[schema.SourceFile]) -> schema.AppendRecord | None:
    """The latest append whose source files include every one of `sources` (by SHA-256): the append that brought
    these files in. None when no append holds them all (files of the dataset's own preparation, or new ones)."""
    wanted = {s.sha256 for s in sources}
    return next((r for r in reversed(manifest.lineage) if wanted <= {s.sha256 for s in r.sources}), None)


def _unchanged(ds: Dataset, on_written) -> tuple[schema.Manifest, bool]:
    if on_written is not None:
        on_written(ds)
    return ds.manifest, False


def append(dataset_dir: Path, raw: RawLog, *, skip_invalid: bool = False, allow_late: bool = False,
           min_time: int | None = None, max_time: int | None = None,
           vectorize: Callable[[list[str]], np.ndarray] | None = None, log=print,
           on_written: Callable[[Dataset], None] | None = None) -> tuple[schema.Manifest, bool]:
    """Returns (the dataset's manifest, whether anything was appended). `on_written` sees the dataset as the call
    leaves it (the new version, or the unchanged one) while the lock is still held: a concurrent append may
    otherwise be replacing the files it reads."""
    t0 = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    Dataset.open(dataset_dir)  # a clear error for a directory that is not a dataset, before taking the lock
    with exclusive(dataset_dir.parent, f"the folder of dataset {dataset_dir}", log=log):
        ds = Dataset.open(dataset_dir)  # again, under the lock: another append may have just finished
        m = ds.manifest
        if m.clock != "seconds":
            raise PinnerformerError(f"{dataset_dir} is order-only: positions restart in every input file, so it "
                                    "cannot grow by appends (prepare the whole sequences again)")
        new_sources = source_files(raw.sources)
        seen = {s.sha256 for s in m.sources} | {s.sha256 for r in m.lineage for s in r.sources}
        if all(s.sha256 in seen for s in new_sources):
            log(f"{', '.join(map(str, raw.sources))}: already in {dataset_dir} (the same SHA-256): nothing to append")
            return _unchanged(ds, on_written)
        checker = Checker(skip_invalid, raw.skipped, raw.line_label)
        ev, clock, duplicates = clean_events(raw, m.action_names(), checker, min_time, max_time)
        users = _extend(ds.users["user_id"], ev["user"], "user", raw.sources[0])
        items = _extend(ds.items["item_id"], ev["item"], "item", raw.sources[0])
        ev = ev.with_columns(pl.col("user").cast(users.dtype), pl.col("item").cast(items.dtype))
        surfaces = m.surfaces + sorted(set(ev["surface"].drop_nulls().unique().to_list()) - set(m.surfaces))
        ev = encode_ids(ev, users, items, surfaces)
        old_ev = ds.events()
        key = ["user", "item", "action", "ts", "detail"]
        n = ev.height
        ev = ev.join(old_ev.select(key), on=key, how="anti", nulls_equal=True, maintain_order="left")
        duplicates += n - ev.height
        if ev.height == 0:
            log(f"every event of {raw.sources[0]} is already in {dataset_dir}: nothing to append")
            return _unchanged(ds, on_written)
        late = int((ev["ts"] < m.time_max).sum())
        end = dt.datetime.fromtimestamp(m.time_max, dt.timezone.utc)
        if late and not allow_late:
            raise InputError(f"{late:,} event(s) are older than the dataset's last event ({end:%Y-%m-%d %H:%M:%S} "
                             "UTC): they would change days that may already be embedded", path=raw.sources[0],
                             hint="--allow-late keeps them (counted; the next embed then recomputes every user)")
        # old events first: events at the same second keep their order of arrival
        events = pl.concat([old_ev, ev]).sort(["user", "ts"], maintain_order=True)
        n_old_items = ds.items.height
        rows, _, _ = item_rows(raw, n_old_items, items[n_old_items:])
        vectors = m.content_vectors
        if vectors is not None:
            rows, vectors = _with_vectors(ds, rows, vectorize)
        item_table = pl.concat([ds.items, rows.select(ds.items.columns)])
        user_table = pl.DataFrame({"user": pl.int_range(users.len(), eager=True, dtype=pl.Int32), "user_id": users})
        timelines = build_timelines(events, users.len(), m.clock)
        counts = np.bincount(timelines.action, minlength=len(m.actions))
        record = schema.AppendRecord(
            parent_fingerprint=m.fingerprint, sources=new_sources, time_min=int(ev["ts"].min()),
            time_max=int(ev["ts"].max()), events=ev.height, new_users=users.len() - ds.users.height,
            new_items=items.len() - n_old_items, late_events=late, duplicates_removed=duplicates,
            skipped=dict(raw.skipped), appended_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        manifest = m.model_copy(update=dict(
            pinnerformer_version=__version__, n_events=events.height, n_users=users.len(), n_items=items.len(),
            surfaces=surfaces, events_per_action={a.name: int(c) for a, c in zip(m.actions, counts)},
            time_min=int(timelines.ts.min()), time_max=int(timelines.ts.max()), has_surface=bool(surfaces),
            has_duration=bool(events["duration"].is_not_null().any()), content_vectors=vectors,
            fingerprint=fingerprint(timelines, m.actions, users, items), ancestors=m.ancestors + [m.fingerprint],
            lineage=m.lineage + [record]))
        write_dataset(dataset_dir, events, user_table, item_table, timelines, manifest)
        if on_written is not None:
            on_written(Dataset.open(dataset_dir))
    log(f"appended {record.events:,} events ({record.new_users:,} new users, {record.new_items:,} new items, "
        f"{late:,} late, {duplicates:,} duplicates removed) in {time.perf_counter() - t0:.1f}s -> {dataset_dir}")
    return manifest, True


def _with_vectors(ds: Dataset, rows: pl.DataFrame, vectorize) -> tuple[pl.DataFrame, schema.ContentVectors]:
    """The new items' content vectors from their text (zero without text, as `items embed-text` does)."""
    cv = ds.manifest.content_vectors
    text = rows["text"]
    has = (text.is_not_null() & (text.str.strip_chars() != "")).to_numpy()
    vecs = np.zeros((rows.height, cv.dim), dtype=np.float32)
    if has.any():
        if vectorize is None:
            raise PinnerformerError(f"{ds.path} has item content vectors ({cv.model}): the {int(has.sum())} new "
                                    "item(s) with text need theirs (install the [text] extra)")
        vecs[has] = vectorize([text[int(i)] for i in np.flatnonzero(has)])
    rows = rows.with_columns(pl.Series("content_vector", vecs).cast(pl.List(pl.Float32)))
    all_vecs = np.concatenate([ds.content_vectors(), vecs])
    return rows, cv.model_copy(update={"items_without_text": cv.items_without_text + int((~has).sum()),
                                       "sha256": hashlib.sha256(all_vecs.tobytes()).hexdigest()})
