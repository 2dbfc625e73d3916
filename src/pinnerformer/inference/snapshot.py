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
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pinnerformer.errors import PinnerformerError

SNAPSHOT_SCHEMA_VERSION = 1
EMBEDDINGS = "embeddings.parquet"
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
_DAY_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise PinnerformerError(f"{text!r} is not a day (expected YYYY-MM-DD)") from None


def day_end_ts(day: dt.date) -> int:
    """Unix seconds of the end of `day` in UTC (= midnight starting the next day): the as-of cut-off."""
    nxt = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)
    return int(nxt.timestamp())


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
    manifest: dict

    @staticmethod
    def open(path: str | Path) -> "Snapshot":
        path = Path(path)
        if not (path / MANIFEST).exists():
            days = [p.name for p in complete_snapshots(path)]
            if days:
                raise PinnerformerError(f"{path} is a snapshot root, not a snapshot: pass one of its day "
                                        f"directories ({', '.join(days)})")
            raise PinnerformerError(f"{path}: not a complete embedding snapshot (no {MANIFEST})")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("kind") != "user-embeddings":
            raise PinnerformerError(f"{path / MANIFEST}: not a user-embedding snapshot manifest")
        return Snapshot(path, manifest)

    @property
    def day(self) -> dt.date:
        return dt.date.fromisoformat(self.manifest["as_of"])

    @cached_property
    def table(self) -> pa.Table:
        return pq.read_table(self.path / EMBEDDINGS)

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

    def lookup(self, user_id) -> int:
        """Row of an external user id; a clear error when the user has no embedding in this snapshot."""
        ids = self.table.column("user_id")
        try:
            key = pa.scalar(user_id).cast(ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            raise PinnerformerError(f"user id {user_id!r} is not a valid {ids.type} id") from None
        import pyarrow.compute as pc

        rows = pc.index(ids, key).as_py()
        if rows < 0:
            raise PinnerformerError(
                f"user {user_id!r} is not in snapshot {self.path} ({self.table.num_rows:,} users as of "
                f"{self.manifest['as_of']}): unknown id, or no action up to that day")
        return rows


def complete_snapshots(root: Path) -> list[Path]:
    """Complete day directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _DAY_DIR.match(p.name) and (p / MANIFEST).exists())
