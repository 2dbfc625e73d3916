"""The daily hand-over while serving: the work directory's newest complete snapshot becomes the store's day version
(its users' retrieval vectors, the ranker's feature vectors and lifelong sequences as of that day), the models are
loaded again, and the service switches to the new (models, day version) pair in one assignment — requests that
started before finish with the old pair, none sees half of each (`Service.swap`). The store's feature counters of
the days before both versions' ends are then dropped: both versions' datasets hold those days, and a request reads
the counters from its own version's end on only.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from pinnerformer.inference.snapshot import Snapshot, complete_snapshots
from pinnerformer.serving import engine as eng
from pinnerformer.serving.store import OnlineStore


def newest_snapshot(workdir: Path) -> Snapshot | None:
    root = workdir / "snapshots"
    found = complete_snapshots(root) if root.is_dir() else []
    return Snapshot.open(found[-1]) if found else None


def retrieval_vectors(snap: Snapshot) -> dict[str, np.ndarray]:
    ids = [str(u) for u in snap.table.column("user_id").to_pylist()]
    return dict(zip(ids, np.asarray(snap.vectors, dtype=np.float32)))


def ensure_day(bundle: eng.Bundle, store: OnlineStore, workdir: Path, log=print) -> str:
    """The day version to serve: the newest snapshot's day (published now unless the store has it), or, without
    snapshots, the dataset's last day (ranking vectors and lifelong sequences only: retrieval falls back to
    cold start)."""
    snap = newest_snapshot(workdir)
    if snap is not None:
        day = snap.day
    else:
        day = dt.datetime.fromtimestamp(bundle.ds.manifest.time_max, dt.timezone.utc).date()
    version = eng.day_version(bundle, day)
    if version in store.versions():
        if store.current_version() != version:
            store.publish(version)
        return version
    log(f"day version {version}: writing it to the store {store.url}")
    return eng.publish_day(bundle, store, day, retrieval_vectors(snap) if snap is not None else None, log=log)


async def watch(service, seconds: float, log=print) -> None:
    """Every `seconds`, hand over when the work directory has a snapshot of a newer day than the one served (the
    daily job's output, as it appears)."""
    import asyncio

    while True:
        await asyncio.sleep(seconds)
        try:
            snap = await asyncio.to_thread(newest_snapshot, service.bundle.workdir)
            served = service.state[1]
            if snap is not None and (served is None or snap.day.isoformat() > served[:10]):
                log(f"snapshot of {snap.day} found: handing over")
                await asyncio.to_thread(hand_over, service, log)
        except Exception as e:  # noqa: BLE001 - a failed hand-over leaves the old pair serving; said, retried
            log(f"hand-over failed, still serving {service.state[1]}: {e}")


def hand_over(service, log=print) -> dict:
    """Load the work directory again and switch the service to it; returns the versions now served."""
    old_bundle, old_version = service.snapshot()
    bundle = eng.load_bundle(old_bundle.workdir, old_bundle.device)
    version = ensure_day(bundle, service.store, old_bundle.workdir, log=log)
    service.swap(bundle, version)
    if old_version is not None:  # the days before both versions' ends: no request of either reads their counters
        service.store.prune_counters(min(eng.version_end(old_version), eng.version_end(version)))
    return {"before": {**old_bundle.version, "day": old_version or "none"}, "now": {**bundle.version, "day": version}}
