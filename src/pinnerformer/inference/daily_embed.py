"""`pinnerformer embed`: the daily batch job that computes user embeddings as of the end of a day.

Incremental: when an earlier complete snapshot made by the same checkpoint (and dtype, device, compilation) exists,
only users with an action after that snapshot's day and up to the end of the as-of day are recomputed; every other
user's vector is copied from it byte for byte. Without one, every user with an action up to the as-of day is
computed. (A user's embedding depends only on their own actions, their times relative to the newest one included,
so a user without new actions would get the same vector again.)

Kill-safe and idempotent: the job writes into `.staging-DAY/`, whose `plan.json` fixes the work (checkpoint,
previous snapshot, the users to recompute, the shard size). Users are cut into shards (`inference.shards`), each
written to its own part file by rename. A restarted job with the same plan skips the parts already there; a
different plan discards the staging directory. The parts and the carried-over rows are merged into
`embeddings.parquet`, the manifest is written, and the staging directory is renamed to `DAY/` — the only moment
the snapshot becomes visible. Re-running a day that is complete does nothing (use `force` to recompute it; the old
snapshot is replaced by rename, never edited in place).

Engines: "local" runs the shards in this process; "ray" runs the same shard function in a pool of Ray actors.
Both write the same parts, so they produce the same snapshot.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pinnerformer.version import __version__
from pinnerformer.config import StrictModel
from pinnerformer.data.clock import day_end_ts
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.inference.shards import LocalEngine, RayEngine, ShardWork, n_shards, shard_path
from pinnerformer.inference.snapshot import (
    DTYPES, EMBEDDINGS, MANIFEST, CheckpointRef, Dtype, Snapshot, SnapshotManifest, SnapshotRef, complete_snapshots,
    content_hash, embeddings_table, vectors_of,
)
from pinnerformer.io import atomic_dir, atomic_path, exclusive, recover_swap, swap_in, write_json_atomic
from pinnerformer.runs.run_dir import RunDir


class EmbedPlan(StrictModel):
    """The work of one day's job, fixed before any shard runs: a restarted job resumes only an identical plan."""

    as_of: str
    checkpoint_sha256: str
    dataset_fingerprint: str
    dtype: Dtype
    previous: SnapshotRef | None
    pending_users: int
    pending_sha256: str
    shard_users: int
    device: str
    compile: bool


@dataclass
class DailyJob:
    run_dir: Path
    ds: Dataset
    day: dt.date
    root: Path
    dtype: str = "float32"
    checkpoint: str = "best"
    shard_users: int = 4096
    batch_size: int = 256
    device: str = "cpu"  # local engine: cpu, or cuda (bf16 autocast; vectors then differ from CPU ones ~1e-2)
    compile: bool = False  # local engine: torch.compile the transformer (fused kernels; vectors differ in last bits)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PinnerformerError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.ds.manifest.clock != "seconds":
            raise PinnerformerError(f"{self.ds.path} is order-only (no real timestamps): a daily snapshot needs "
                                    "days; embed needs a dataset with a real clock")
        self.end_ts = day_end_ts(self.day)
        if self.end_ts <= self.ds.manifest.time_min:
            raise PinnerformerError(f"as-of day {self.day} is before the data's first action "
                                    f"({self.ds.manifest.time_range_text()}): no user has an embedding yet")
        self.root = Path(self.root)
        self.final = self.root / self.day.isoformat()
        self.staging = self.root / f".staging-{self.day.isoformat()}"
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise PinnerformerError(f"device {self.device!r}: expected cpu, cuda or auto")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PinnerformerError("device cuda: no CUDA GPU is visible to torch on this machine")
        self.model_run = RunDir(self.run_dir)
        self.ck_sha = self.model_run.checkpoint_sha256(self.checkpoint)

    # -- planning ---------------------------------------------------------------------------------------------
    def previous(self) -> tuple[Snapshot | None, str]:
        """The latest complete snapshot before `day` that this job may carry vectors over from, and why (not)."""
        older = [p for p in complete_snapshots(self.root) if p.name < self.day.isoformat()]
        if not older:
            return None, "no earlier snapshot: full computation"
        snap = Snapshot.open(older[-1])
        m = snap.manifest
        if m.checkpoint.sha256 != self.ck_sha:
            return None, f"earlier snapshot {snap.path.name} was made by another checkpoint: full computation"
        if not self.ds.manifest.descends_from(m.dataset.fingerprint):
            return None, f"earlier snapshot {snap.path.name} was made from another dataset: full computation"
        lineage = self.ds.manifest.lineage
        since = next((i for i, r in enumerate(lineage) if r.parent_fingerprint == m.dataset.fingerprint), len(lineage))
        if any(r.late_events for r in lineage[since:]):
            return None, (f"events older than earlier snapshot {snap.path.name}'s data were appended since "
                          "(--allow-late): full computation")
        if m.device != self.device:
            return None, f"earlier snapshot {snap.path.name} was computed on {m.device}: full computation"
        if m.compile != self.compile:
            how = "compiled" if m.compile else "eager"
            return None, f"earlier snapshot {snap.path.name} was computed by the {how} model: full computation"
        if m.dtype != self.dtype:
            return None, f"earlier snapshot {snap.path.name} is {m.dtype}, not {self.dtype}: full computation"
        try:
            snap.verify()
        except PinnerformerError as e:
            return None, f"{e}: not carried over, full computation"
        return snap, f"incremental from {snap.path.name}"

    def pending_users(self, prev: Snapshot | None) -> np.ndarray:
        """Users to recompute: an action after the previous snapshot's inputs and up to the as-of day
        (incremental), or any action up to it. The previous snapshot's inputs end with its day, or earlier when its
        dataset ended earlier (events of that day appended since must be taken in)."""
        tl = self.ds.timelines
        ts = np.asarray(tl.ts)
        mask = ts < self.end_ts
        if prev is not None:
            since = day_end_ts(prev.day)
            if prev.manifest.data_time_max is not None:
                since = min(since, prev.manifest.data_time_max)
            mask &= ts >= since
        return np.unique(tl.user_of_event()[mask]).astype(np.int64)

    def plan(self, prev: Snapshot | None, pending: np.ndarray) -> EmbedPlan:
        return EmbedPlan(as_of=self.day.isoformat(), checkpoint_sha256=self.ck_sha,
                         dataset_fingerprint=self.ds.manifest.fingerprint, dtype=self.dtype,
                         previous=None if prev is None else prev.manifest.ref(), pending_users=int(len(pending)),
                         pending_sha256=hashlib.sha256(pending.astype(np.int64).tobytes()).hexdigest(),
                         shard_users=self.shard_users, device=self.device, compile=self.compile)

    def work(self) -> ShardWork:
        return ShardWork(run_dir=str(self.model_run.path.resolve()), dataset_dir=str(Path(self.ds.path).resolve()),
                         checkpoint=self.checkpoint, staging=str(self.staging.resolve()), end_ts=int(self.end_ts),
                         shard_users=self.shard_users, batch_size=self.batch_size, device=self.device,
                         compile=self.compile)

    def _open_staging(self, plan: EmbedPlan, pending: np.ndarray) -> list[int]:
        """Resume a staging directory with the same plan, or start a fresh one. Returns the shards still to do."""
        plan_path = self.staging / "plan.json"
        if self.staging.exists():
            try:
                same = EmbedPlan.model_validate(json.loads(plan_path.read_text())) == plan
            except (OSError, ValueError):  # no plan, or not one this version wrote: another job's leftovers
                same = False
            if not same:
                shutil.rmtree(self.staging)
        if not self.staging.exists():
            # the staging directory appears complete with its plan, or not at all
            with atomic_dir(self.staging) as tmp:
                (tmp / "parts").mkdir()
                np.save(tmp / "pending.npy", pending)
                write_json_atomic(tmp / "plan.json", plan)
        return [k for k in range(n_shards(pending, self.shard_users)) if not shard_path(self.staging, k).exists()]

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, engine: str = "local", force: bool = False, ray_address: str | None = None,
            ray_actors: int = 2, ray_cpus_per_actor: float = 0.5, log=print, progress: bool = True
            ) -> SnapshotManifest:
        t0 = time.perf_counter()
        if engine == "local":
            runner = LocalEngine()
        elif engine == "ray":
            runner = RayEngine(ray_address, ray_actors, ray_cpus_per_actor)
        else:
            raise PinnerformerError(f"engine {engine!r}: expected local or ray")
        work = self.work()
        runner.check(work)
        self.root.mkdir(parents=True, exist_ok=True)
        # one writer per snapshot root: a second job waits, then finds the day complete (or made by another
        # checkpoint, and refuses): two jobs never mix their vectors in one snapshot
        with exclusive(self.root, f"snapshot root {self.root}", log=log):
            return self._run(runner, work, engine, force, log, progress, t0)

    def _run(self, runner, work: ShardWork, engine: str, force: bool, log, progress: bool, t0: float
             ) -> SnapshotManifest:
        recover_swap(self.final)  # a --force swap killed between its two renames: put the old snapshot back
        if self.final.exists() and not force:
            done = Snapshot.open(self.final).manifest
            late = self._arrived_since(done)
            if late:
                log(f"{self.final} was made before all of its day's events had arrived ({late:,} since): "
                    "recomputing it")
                force = True
        if self.final.exists() and not force:
            if done.checkpoint.sha256 == self.ck_sha and done.dtype == self.dtype:
                log(f"{self.final} is already complete ({done.users:,} users); nothing to do (--force recomputes it)")
                return done
            raise PinnerformerError(f"{self.final} exists but was made by another checkpoint or dtype: "
                                    "use --force to replace it, or another --output")
        prev, why = self.previous()
        pending = self.pending_users(prev)
        todo = self._open_staging(self.plan(prev, pending), pending)
        shards = n_shards(pending, self.shard_users)
        log(f"as of {self.day} (events before {dt.datetime.fromtimestamp(self.end_ts, dt.timezone.utc):%Y-%m-%d %H:%M} "
            f"UTC): {why}; {len(pending):,} users to compute in {shards} shard(s)"
            + (f", {shards - len(todo)} already done by an earlier attempt" if len(todo) < shards else ""))
        if todo:
            runner.run(work, todo, pending, progress)
        manifest = self._publish(prev, pending, shards, engine, t0)
        log(f"wrote {self.final}: {manifest.users:,} users ({manifest.recomputed:,} recomputed, "
            f"{manifest.carried_over:,} carried over), {self.dtype}, {manifest.wall_s:.1f}s")
        return manifest

    def _publish(self, prev: Snapshot | None, pending: np.ndarray, shards: int, engine: str, t0: float
                 ) -> SnapshotManifest:
        parts_u, parts_v = [], []
        for k in range(shards):
            path = shard_path(self.staging, k)
            if not path.exists():
                raise PinnerformerError(f"{path} is missing after the job ran: re-run to complete it")
            t = pq.read_table(path)
            parts_u.append(t.column("user").to_numpy())
            parts_v.append(vectors_of(t))
        dim = self._dim(parts_v, prev)
        new_u = np.concatenate(parts_u) if parts_u else np.zeros(0, np.int32)
        new_v = (np.concatenate(parts_v) if parts_v else np.zeros((0, dim), np.float32)).astype(DTYPES[self.dtype])
        if not np.isfinite(new_v).all():
            raise PinnerformerError(f"{self.staging}: the model produced NaN or infinite vectors for "
                                    f"{int((~np.isfinite(new_v).all(1)).sum())} user(s); nothing was published")
        if not np.array_equal(new_u, pending):
            raise PinnerformerError(f"{self.staging}: the parts do not hold exactly the planned users; delete the "
                                    "staging directory and re-run")
        if prev is not None:
            keep = ~np.isin(prev.users, pending)
            old_u, old_v = prev.users[keep], prev.vectors[keep]
        else:
            old_u, old_v = np.zeros(0, np.int32), np.zeros((0, dim), DTYPES[self.dtype])
        users = np.concatenate([old_u.astype(np.int64), new_u.astype(np.int64)])
        vecs = np.concatenate([old_v, new_v])
        order = np.argsort(users, kind="stable")
        users, vecs = users[order], vecs[order]
        user_ids = self.ds.users["user_id"].to_arrow().take(pa.array(users))
        with atomic_path(self.staging / EMBEDDINGS) as tmp:
            pq.write_table(embeddings_table(users, user_ids, vecs), tmp)
        manifest = SnapshotManifest(
            pinnerformer_version=__version__, as_of=self.day.isoformat(), inputs_before_ts=self.end_ts,
            dtype=self.dtype, dim=int(dim), users=int(len(users)), recomputed=int(len(new_u)),
            carried_over=int(len(old_u)), previous_snapshot=None if prev is None else prev.manifest.ref(),
            checkpoint=CheckpointRef(run=str(self.model_run.path.resolve()), name=self.checkpoint, sha256=self.ck_sha),
            dataset=DatasetRef(path=str(Path(self.ds.path).resolve()), fingerprint=self.ds.manifest.fingerprint),
            engine=engine, device=self.device, compile=self.compile, content_sha256=content_hash(users, vecs),
            wall_s=round(time.perf_counter() - t0, 3),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            data_time_max=self.ds.manifest.time_max, unseen=self.model_run.unseen(self.ds))
        write_json_atomic(self.staging / MANIFEST, manifest)
        for name in ("parts", "pending.npy", "plan.json"):
            p = self.staging / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        swap_in(self.staging, self.final)  # --force: by renames, never editing a published snapshot in place
        return manifest

    def _arrived_since(self, done: SnapshotManifest) -> int:
        """Events of the snapshot's days that the dataset gained after the snapshot was made (appended later, late
        ones included)."""
        if done.data_time_max is None or done.dataset.fingerprint == self.ds.manifest.fingerprint:
            return 0
        ts = np.asarray(self.ds.timelines.ts)
        lineage = self.ds.manifest.lineage  # late events appended since (older than the snapshot's data) count too
        since = next((i for i, r in enumerate(lineage) if r.parent_fingerprint == done.dataset.fingerprint),
                     len(lineage))
        late = sum(r.late_events for r in lineage[since:] if r.time_min < self.end_ts)
        return int(((ts > done.data_time_max) & (ts < self.end_ts)).sum()) + late

    def _dim(self, parts_v: list[np.ndarray], prev: Snapshot | None) -> int:
        if parts_v:
            return parts_v[0].shape[1]
        if prev is not None:
            return prev.manifest.dim
        raise PinnerformerError(f"no user has an action up to {self.day}: nothing to embed")
