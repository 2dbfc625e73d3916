"""`pinnerformer embed`: the daily batch job that computes user embeddings as of the end of a day (SPEC §4).

Incremental: when an earlier complete snapshot made by the same checkpoint (and dtype) exists, only users with
an action after that snapshot's day and up to the end of the as-of day are recomputed; every other user's
vector is copied from it byte for byte. Without one, every user with an action up to the as-of day is computed.
(A user's embedding depends only on their own actions, their times relative to the newest one included, so a
user without new actions would get the same vector again.)

Kill-safe and idempotent: the job writes into `.staging-DAY/`, whose `plan.json` fixes the work (checkpoint,
previous snapshot, the users to recompute, the shard size). Users are cut into shards; each shard is written to
`parts/part-NNNNN.parquet` by rename, so a part is either complete or absent. A restarted job with the same plan
skips the parts already there; a different plan discards the staging directory. The parts and the carried-over
rows are merged into `embeddings.parquet`, the manifest is written, and the staging directory is renamed to
`DAY/` — the only moment the snapshot becomes visible. Re-running a day that is complete does nothing (use
`force` to recompute it; the old snapshot is replaced by rename, never edited in place).

Engines: "local" runs the shards in this process; "ray" runs the same shard function in a pool of Ray actors
(`pinnerformer.inference.ray_engine`). Both write the same parts, so they produce the same snapshot.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pinnerformer import __version__
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import write_json_atomic
from pinnerformer.errors import PinnerformerError
from pinnerformer.inference.snapshot import (
    DTYPES, EMBEDDINGS, MANIFEST, SNAPSHOT_SCHEMA_VERSION, Snapshot, complete_snapshots, content_hash, day_end_ts,
    embeddings_table, vectors_of,
)
from pinnerformer.progress import progress_bar
from pinnerformer.training.trainer import embed_users

DAY = 86400


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_path(run_dir: Path, checkpoint: str = "best") -> Path:
    path = Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        raise PinnerformerError(f"{path} does not exist (is {run_dir} a finished training run?)")
    return path


def user_ranges_as_of(ds: Dataset, users: np.ndarray, end_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) event ranges of `users` holding their actions with ts < end_ts."""
    tl = ds.timelines
    starts = np.asarray(tl.offsets[:-1])[users].astype(np.int64)
    stops = np.asarray(tl.offsets[1:])[users].astype(np.int64)
    ends = np.array([s + int(np.searchsorted(tl.ts[s:e], end_ts, side="left")) for s, e in zip(starts, stops)],
                    dtype=np.int64)
    return starts, ends


def shard_of(pending: np.ndarray, k: int, shard_users: int) -> np.ndarray:
    """The users of shard k: a fixed slice of the sorted pending users, the same in every engine and attempt."""
    return pending[k * shard_users:(k + 1) * shard_users]


def n_shards(pending: np.ndarray, shard_users: int) -> int:
    return -(-len(pending) // shard_users)


def shard_path(staging: Path, k: int) -> Path:
    return staging / "parts" / f"part-{k:05d}.parquet"


def run_shard(model, ds: Dataset, staging: Path, k: int, users: np.ndarray, end_ts: int, batch_size: int) -> int:
    """Embed one shard of users and publish its part file by rename. Shared by every engine."""
    starts, ends = user_ranges_as_of(ds, users, end_ts)
    vecs = embed_users(model, ds, starts, ends, next(model.parameters()).device, batch_size,
                       fixed_shape=True).cpu().numpy()
    table = pa.table({"user": pa.array(users, type=pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])})
    final = shard_path(staging, k)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return len(users)


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
        self.ck_path = checkpoint_path(self.run_dir, self.checkpoint)
        self.ck_sha = file_sha256(self.ck_path)

    # -- planning ---------------------------------------------------------------------------------------------
    def previous(self) -> tuple[Snapshot | None, str]:
        """The latest complete snapshot before `day` that this job may carry vectors over from, and why (not)."""
        older = [p for p in complete_snapshots(self.root) if p.name < self.day.isoformat()]
        if not older:
            return None, "no earlier snapshot: full computation"
        snap = Snapshot.open(older[-1])
        m = snap.manifest
        if m["checkpoint"]["sha256"] != self.ck_sha:
            return None, f"earlier snapshot {snap.path.name} was made by another checkpoint: full computation"
        if m["dataset"]["fingerprint"] != self.ds.manifest.fingerprint:
            return None, f"earlier snapshot {snap.path.name} was made from another dataset: full computation"
        if m.get("device", "cpu") != self.device:
            return None, f"earlier snapshot {snap.path.name} was computed on {m.get('device')}: full computation"
        if m.get("compile", False) != self.compile:
            how = "compiled" if m.get("compile", False) else "eager"
            return None, f"earlier snapshot {snap.path.name} was computed by the {how} model: full computation"
        if m["dtype"] != self.dtype:
            return None, f"earlier snapshot {snap.path.name} is {m['dtype']}, not {self.dtype}: full computation"
        return snap, f"incremental from {snap.path.name}"

    def pending_users(self, prev: Snapshot | None) -> np.ndarray:
        """Users to recompute: an action in (previous day, as-of day] (incremental), or any action up to it."""
        tl = self.ds.timelines
        ts = np.asarray(tl.ts)
        mask = ts < self.end_ts
        if prev is not None:
            mask &= ts >= day_end_ts(prev.day)
        return np.unique(tl.user_of_event()[mask]).astype(np.int64)

    def plan(self, prev: Snapshot | None, pending: np.ndarray) -> dict:
        return {"as_of": self.day.isoformat(), "checkpoint_sha256": self.ck_sha,
                "dataset_fingerprint": self.ds.manifest.fingerprint, "dtype": self.dtype,
                "previous": None if prev is None else {"as_of": prev.manifest["as_of"],
                                                       "content_sha256": prev.manifest["content_sha256"]},
                "pending_users": int(len(pending)),
                "pending_sha256": hashlib.sha256(pending.astype(np.int64).tobytes()).hexdigest(),
                "shard_users": self.shard_users, "device": self.device, "compile": self.compile}

    def _open_staging(self, plan: dict, pending: np.ndarray) -> list[int]:
        """Resume a staging directory with the same plan, or start a fresh one. Returns the shards still to do."""
        plan_path = self.staging / "plan.json"
        if self.staging.exists():
            same = plan_path.exists() and json.loads(plan_path.read_text()) == plan
            if not same:
                shutil.rmtree(self.staging)
        if not self.staging.exists():
            tmp = self.root / f".staging-{self.day.isoformat()}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "parts").mkdir(parents=True)
            np.save(tmp / "pending.npy", pending)
            write_json_atomic(tmp / "plan.json", plan)
            os.replace(tmp, self.staging)
        return [k for k in range(n_shards(pending, self.shard_users)) if not shard_path(self.staging, k).exists()]

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, engine: str = "local", force: bool = False, ray_address: str | None = None,
            ray_actors: int = 2, ray_cpus_per_actor: float = 0.5, log=print, progress: bool = True) -> dict:
        t0 = time.perf_counter()
        if engine == "ray" and self.device != "cpu":
            raise PinnerformerError("the ray engine runs CPU actors; use --engine local for --device cuda")
        if engine == "ray" and self.compile:
            raise PinnerformerError("--compile is for the local engine; the ray engine runs the eager model")
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover_replaced()
        if self.final.exists() and not force:
            done = Snapshot.open(self.final)
            if done.manifest["checkpoint"]["sha256"] == self.ck_sha and done.manifest["dtype"] == self.dtype:
                log(f"{self.final} is already complete ({done.manifest['users']:,} users); nothing to do "
                    "(--force recomputes it)")
                return done.manifest
            raise PinnerformerError(f"{self.final} exists but was made by another checkpoint or dtype: "
                                    "use --force to replace it, or another --output")
        prev, why = self.previous()
        pending = self.pending_users(prev)
        plan = self.plan(prev, pending)
        todo = self._open_staging(plan, pending)
        shards = n_shards(pending, self.shard_users)
        log(f"as of {self.day} (events before {dt.datetime.fromtimestamp(self.end_ts, dt.timezone.utc):%Y-%m-%d %H:%M} "
            f"UTC): {why}; {len(pending):,} users to compute in {shards} shard(s)"
            + (f", {shards - len(todo)} already done by an earlier attempt" if len(todo) < shards else ""))
        if todo:
            if engine == "local":
                self._run_local(todo, pending, progress)
            elif engine == "ray":
                from pinnerformer.inference.ray_engine import run_shards_on_ray

                run_shards_on_ray(self, todo, pending, address=ray_address, actors=ray_actors,
                                  cpus_per_actor=ray_cpus_per_actor, progress=progress)
            else:
                raise PinnerformerError(f"engine {engine!r}: expected local or ray")
        manifest = self._publish(prev, pending, shards, engine, t0)
        log(f"wrote {self.final}: {manifest['users']:,} users ({manifest['recomputed']:,} recomputed, "
            f"{manifest['carried_over']:,} carried over), {self.dtype}, {manifest['wall_s']:.1f}s")
        return manifest

    def _run_local(self, todo: list[int], pending: np.ndarray, progress: bool) -> None:
        from pinnerformer.evaluation.evaluate import load_run

        model, _ = load_run(self.run_dir, self.ds, self.checkpoint)
        model = model.to(torch.device(self.device))
        if self.compile:  # fixed [batch_size, M] shapes: one compiled graph serves every batch
            model.user_state = torch.compile(model.user_state, dynamic=False)
        bar = progress_bar(total=sum(len(shard_of(pending, k, self.shard_users)) for k in todo),
                           unit="user", desc="embed", disable=not progress)
        for k in todo:
            users = shard_of(pending, k, self.shard_users)
            bar.update(run_shard(model, self.ds, self.staging, k, users, self.end_ts, self.batch_size))
        bar.close()

    def _publish(self, prev: Snapshot | None, pending: np.ndarray, shards: int, engine: str, t0: float) -> dict:
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
        table = embeddings_table(users, user_ids, vecs)
        tmp = self.staging / f".{EMBEDDINGS}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.staging / EMBEDDINGS)
        manifest = {
            "kind": "user-embeddings", "schema_version": SNAPSHOT_SCHEMA_VERSION, "pinnerformer_version": __version__,
            "as_of": self.day.isoformat(), "inputs_before_ts": self.end_ts, "dtype": self.dtype, "dim": int(dim),
            "users": int(len(users)), "recomputed": int(len(new_u)), "carried_over": int(len(old_u)),
            "previous_snapshot": None if prev is None else {"as_of": prev.manifest["as_of"],
                                                            "content_sha256": prev.manifest["content_sha256"]},
            "checkpoint": {"run": str(Path(self.run_dir).resolve()), "name": self.checkpoint, "sha256": self.ck_sha},
            "dataset": {"path": str(Path(self.ds.path).resolve()), "fingerprint": self.ds.manifest.fingerprint},
            "engine": engine, "device": self.device, "compile": self.compile, "content_sha256": content_hash(users, vecs),
            "wall_s": round(time.perf_counter() - t0, 3),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(self.staging / MANIFEST, manifest)
        for name in ("parts", "pending.npy", "plan.json"):
            p = self.staging / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if self.final.exists():  # --force: swap by renames, never edit a published snapshot in place
            old = self.root / f".replaced-{self.day.isoformat()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.staging, self.final)
            shutil.rmtree(old)
        else:
            os.replace(self.staging, self.final)
        return manifest

    def _recover_replaced(self) -> None:
        """A job killed between the two renames of a --force swap: put the old snapshot back."""
        old = self.root / f".replaced-{self.day.isoformat()}"
        if old.exists():
            if self.final.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, self.final)

    def _dim(self, parts_v: list[np.ndarray], prev: Snapshot | None) -> int:
        if parts_v:
            return parts_v[0].shape[1]
        if prev is not None:
            return int(prev.manifest["dim"])
        raise PinnerformerError(f"no user has an action up to {self.day}: nothing to embed")
