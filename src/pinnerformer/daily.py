"""`pinnerformer daily`: the production loop for one new period of events, as one command.

    append the new events to the dataset (ids keep their indexes; the same file twice is recognised)
    -> embed the users as of the new events' last day, incrementally over the previous snapshot
    -> refresh the item index when the item set or the model changed since it was built

Each step is atomic and re-runnable on its own, so a failed or killed `daily` is simply run again: the append is
recognised, a finished snapshot is kept, a killed one resumes from its shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from pinnerformer.config import StrictModel
from pinnerformer.data.append import append
from pinnerformer.data.clock import utc_day
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.formats.base import RawLog
from pinnerformer.io import file_sha256
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import SnapshotManifest
from pinnerformer.retrieval.index import ItemIndex, build_item_index
from pinnerformer.runs.run_dir import RunDir


class DailyReport(StrictModel):
    appended: bool  # False: these events were already in the dataset
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
    sha = file_sha256(raw.sources[0])
    record = next((r for r in reversed(manifest.lineage) if r.sources[0].sha256 == sha), None)
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
