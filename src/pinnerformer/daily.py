"""`pinnerformer daily`: the production loop for one new period of events, as one command.

    append the new events to the dataset (ids keep their indexes; the same file twice is recognised)
    -> embed the users as of the new events' last day, incrementally over the previous snapshot
    -> refresh the item index when the item set or the model changed since it was built

The new events come from a file (`--input`) or from the online service's event log (`--from-store`: every event
`POST /v1/events` acknowledged, of the complete UTC days not yet taken; `serving.event_log`), which closes the loop
events -> dataset -> snapshot -> service: the service hands over to the new day on its next reload.

Each step is atomic and re-runnable on its own, so a failed or killed `daily` is simply run again: the append is
recognised, a finished snapshot is kept, a killed one resumes from its shards, the log's cursors move only after
the append.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

import numpy as np

from pinnerformer.config import StrictModel
from pinnerformer.data.append import append, find_record
from pinnerformer.data.clock import utc_day
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.formats.base import RawLog
from pinnerformer.data.prepare import source_files
from pinnerformer.errors import PinnerformerError
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import SnapshotManifest
from pinnerformer.retrieval.index import ItemIndex, build_item_index
from pinnerformer.runs.run_dir import RunDir
from pinnerformer.serving.event_log import LogExport, commit_export, events_options, export_log
from pinnerformer.serving.stores import open_store


class DailyReport(StrictModel):
    appended: bool  # False: these events were already in the dataset
    log_export: LogExport | None = None  # --from-store: what was taken from the service's event log
    dataset_fingerprint: str
    day: str  # the snapshot's as-of day: the new events' last day
    snapshot: SnapshotManifest
    index_rebuilt: bool
    index_reason: str


def index_is_current(index_dir: Path, run: RunDir, ds: Dataset, checkpoint: str) -> tuple[bool, str]:
    if not (Path(index_dir) / "manifest.json").exists():
        return False, "no index yet"
    m = ItemIndex.open(index_dir).manifest
    if m.checkpoint.sha256 != run.checkpoint_sha256(checkpoint):
        return False, "the model changed"
    if m.items != ds.manifest.n_items:
        return False, f"the item set grew ({m.items:,} -> {ds.manifest.n_items:,})"
    return True, "item set and model unchanged"


def run_daily(run_dir: Path, dataset_dir: Path, raw: RawLog, snapshot_root: Path, index_dir: Path, *,
              allow_late: bool = False, skip_invalid: bool = False, min_time: int | None = None,
              max_time: int | None = None, vectorize: Callable[[list[str]], np.ndarray] | None = None,
              checkpoint: str = "best", index_kind: str = "hnsw", log=print, progress: bool = True) -> DailyReport:
    run = RunDir(run_dir)
    manifest, appended = append(dataset_dir, raw, allow_late=allow_late, skip_invalid=skip_invalid, min_time=min_time,
                                max_time=max_time, vectorize=vectorize, log=log)
    # the new day: the last event of this file's append (now or earlier); the dataset's end otherwise
    record = find_record(manifest, source_files(raw.sources))
    day = utc_day(record.time_max if record is not None else manifest.time_max)
    ds = Dataset.open(dataset_dir)
    snapshot = DailyJob(run.path, ds, day, snapshot_root, checkpoint=checkpoint).run(log=log, progress=progress)
    current, why = index_is_current(index_dir, run, ds, checkpoint)
    if current:
        log(f"index {index_dir} kept: {why}")
    else:
        log(f"index {index_dir} rebuilt: {why}")
        build_item_index(run.path, ds, index_dir, index_kind, checkpoint=checkpoint, log=log, overwrite=True)
    return DailyReport(appended=appended, dataset_fingerprint=ds.manifest.fingerprint, day=day.isoformat(),
                       snapshot=snapshot, index_rebuilt=not current, index_reason=why)


def run_daily_from_store(run_dir: Path, dataset_dir: Path, store_url: str, snapshot_root: Path, index_dir: Path, *,
                         before: dt.date | None = None, checkpoint: str = "best",
                         vectorize: Callable[[list[str]], np.ndarray] | None = None, index_kind: str = "hnsw",
                         log=print, progress: bool = True) -> DailyReport | None:
    """The daily loop fed by the service's event log: the events of the days before `before` (default: today, UTC:
    complete days only) not taken yet are exported next to the dataset (`event-log/`), appended, embedded; None
    when the log has nothing new. Events that arrive late for a day already taken are appended as late events
    (counted in the lineage): the service acknowledged them, so they are kept."""
    from pinnerformer.data.formats import read_source

    dataset_dir = Path(dataset_dir)
    before = before or dt.datetime.now(dt.timezone.utc).date()
    local = Path(store_url.removeprefix("lmdb://"))
    if not store_url.startswith(("redis://", "rediss://", "unix://")) and not (local / "data.mdb").is_file():
        raise PinnerformerError(f"--from-store {store_url}: no LMDB store there (the service's --store; by default "
                                "WORKDIR/store, created when the service first starts)")
    store = open_store(store_url)
    try:
        export = export_log(store, dataset_dir.parent / "event-log", before, log=log)
    finally:
        store.close()
    if export.path is None:
        return None
    ds = Dataset.open(dataset_dir)
    m = ds.manifest
    id_type = "int" if ds.users["user_id"].dtype.is_integer() and ds.items["item_id"].dtype.is_integer() else "str"
    raw = read_source("events", export.path, events_options(m.action_names(), [a.name for a in m.actions
                                                                               if a.positive], id_type))
    report = run_daily(run_dir, dataset_dir, raw, snapshot_root, index_dir, allow_late=True, checkpoint=checkpoint,
                       vectorize=vectorize, index_kind=index_kind, log=log, progress=progress)
    commit_export(dataset_dir.parent / "event-log", export)
    return report.model_copy(update={"log_export": export})
