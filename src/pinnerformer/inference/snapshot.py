"""Versioned user-embedding snapshots: one directory per as-of day, published atomically.

    SNAPSHOT_ROOT/
        2018-09-23/                 a complete snapshot (it exists only once complete: published by rename)
            embeddings.parquet      user:int32 (dataset index)  user_id  vector:fixed_size_list<float16|float32>[D]
                                    sorted by user
            manifest.json           as-of day, model checkpoint hash, dataset fingerprint, dtype, counts
                                    (recomputed / carried over), previous snapshot, content hash, wall time
        .staging-2018-09-24/        a job in progress (or killed): plan.json, pending.npy, parts/part-*.parquet

Readers only ever look at `YYYY-MM-DD/` directories that hold a manifest, so a half-written snapshot is never
visible as complete. `content_sha256` hashes the user indices and the vector bytes as stored: two snapshots
with the same hash hold bit-identical embeddings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pinnerformer.config import StrictModel
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import read_json_record

SNAPSHOT_SCHEMA_VERSION = 1
EMBEDDINGS = "embeddings.parquet"
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
Dtype = Literal["float16", "float32"]
_DAY_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class CheckpointRef(StrictModel):
    run: str
    name: str
    sha256: str


class SnapshotRef(StrictModel):
    as_of: str
    content_sha256: str


class SnapshotManifest(StrictModel):
    kind: Literal["user-embeddings"] = "user-embeddings"
    schema_version: int = SNAPSHOT_SCHEMA_VERSION
    pinnerformer_version: str
    as_of: str  # YYYY-MM-DD: every input action is before the end of this day (UTC)
    inputs_before_ts: int
    dtype: Dtype
    dim: int
    users: int
    recomputed: int
    carried_over: int
    previous_snapshot: SnapshotRef | None  # the snapshot the carried-over vectors come from
    checkpoint: CheckpointRef
    dataset: DatasetRef
    engine: str
    device: str = "cpu"  # (snapshots written before these two keys existed were eager CPU ones)
    compile: bool = False
    content_sha256: str
    wall_s: float
    created_at: str
    data_time_max: int | None = None  # the dataset's last event when the snapshot was made (it may grow later)
    unseen: dict[str, int] = {}  # users and items the model's training dataset did not have

    @property
    def day(self) -> dt.date:
        return dt.date.fromisoformat(self.as_of)

    def ref(self) -> SnapshotRef:
        return SnapshotRef(as_of=self.as_of, content_sha256=self.content_sha256)


def content_hash(users: np.ndarray, vectors: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(users, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(vectors).tobytes())
    return h.hexdigest()


def embeddings_table(users: np.ndarray, user_ids: pa.Array, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    return pa.table({"user": pa.array(users, type=pa.int32()), "user_id": user_ids,
                     "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def vectors_of(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


@dataclass
class Snapshot:
    """A complete snapshot directory, opened."""

    path: Path
    manifest: SnapshotManifest

    @staticmethod
    def open(path: str | Path) -> "Snapshot":
        path = Path(path)
        if not (path / MANIFEST).exists():
            days = [p.name for p in complete_snapshots(path)]
            if days:
                raise PinnerformerError(f"{path} is a snapshot root, not a snapshot: pass one of its day "
                                        f"directories ({', '.join(days)})")
            raise PinnerformerError(f"{path}: not a complete embedding snapshot (no {MANIFEST})")
        raw = read_json_record(path / MANIFEST, "snapshot manifest")
        if raw.get("kind") != "user-embeddings":
            raise PinnerformerError(f"{path / MANIFEST}: not a user-embedding snapshot manifest")
        try:
            return Snapshot(path, SnapshotManifest.model_validate(raw))
        except ValueError as e:
            raise PinnerformerError(f"{path / MANIFEST}: not a snapshot manifest this version can read: {e}") from None

    @property
    def day(self) -> dt.date:
        return self.manifest.day

    @cached_property
    def table(self) -> pa.Table:
        try:
            return pq.read_table(self.path / EMBEDDINGS)
        except (OSError, pa.ArrowException) as e:
            raise PinnerformerError(f"snapshot {self.path}: {EMBEDDINGS} cannot be read ({str(e).splitlines()[0]}): "
                                    "it is damaged; run the day again with --force") from None

    @cached_property
    def users(self) -> np.ndarray:
        return self.table.column("user").to_numpy()

    @cached_property
    def row_of_user(self) -> dict[int, int]:
        """Dataset user index -> row."""
        return {int(u): i for i, u in enumerate(self.users)}

    @cached_property
    def vectors(self) -> np.ndarray:
        """[n_users, D] in the stored dtype (float16 or float32)."""
        return vectors_of(self.table)

    def verify(self) -> None:
        """The stored vectors are the ones the manifest describes (content hash, count, shape) and all finite."""
        m, vecs = self.manifest, self.vectors
        problem = None
        if len(self.users) != m.users or vecs.shape != (m.users, m.dim):
            problem = f"holds {len(self.users)} users × {vecs.shape[1] if vecs.ndim == 2 else '?'} where its " \
                      f"manifest says {m.users} × {m.dim}"
        elif not np.isfinite(vecs).all():
            problem = "holds NaN or infinite vectors"
        elif content_hash(self.users, vecs) != m.content_sha256:
            problem = "does not match its manifest's content hash (altered or corrupted)"
        if problem:
            raise PinnerformerError(f"snapshot {self.path} {problem}")

    def lookup(self, user_id) -> int:
        """Row of an external user id; a clear error when the user has no embedding in this snapshot."""
        ids = self.table.column("user_id")
        try:
            key = pa.scalar(user_id).cast(ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            raise PinnerformerError(f"user id {user_id!r} is not a valid {ids.type} id") from None
        rows = pc.index(ids, key).as_py()
        if rows < 0:
            raise PinnerformerError(
                f"user {user_id!r} is not in snapshot {self.path} ({self.table.num_rows:,} users as of "
                f"{self.manifest.as_of}): unknown id, or no action up to that day")
        return rows


def complete_snapshots(root: Path) -> list[Path]:
    """Complete day directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _DAY_DIR.match(p.name) and (p / MANIFEST).exists())
