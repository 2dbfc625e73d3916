"""Candidate retrieval: a user's snapshot vector (or an item's vector) against the item index.

The snapshot and the index must come from the same checkpoint: user and item towers are trained together, and
a user vector from one model means nothing in another model's item space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pinnerformer.errors import PinnerformerError
from pinnerformer.inference.snapshot import Snapshot
from pinnerformer.io import atomic_path
from pinnerformer.retrieval.index import ItemIndex


def check_compatible(index: ItemIndex, snap: Snapshot) -> None:
    a, b = index.manifest.checkpoint.sha256, snap.manifest.checkpoint.sha256
    if a != b:
        raise PinnerformerError(f"{index.path} and {snap.path} were made by different checkpoints "
                                f"({a[:12]} vs {b[:12]}): rebuild the index from the snapshot's run")


def _rows_to_frame(index: ItemIndex, scores: np.ndarray, rows: np.ndarray) -> pl.DataFrame:
    ok = rows >= 0
    items = index.items[rows[ok].tolist()]
    return items.with_columns(rank=pl.Series(np.arange(1, rows.shape[0] + 1)[ok].astype(np.int32)),
                              score=pl.Series(scores[ok].astype(np.float32))).select("rank", "score", *items.columns)


def top_k_for_user(index: ItemIndex, snap: Snapshot, user_id, k: int = 10) -> pl.DataFrame:
    check_compatible(index, snap)
    row = snap.lookup(user_id)
    q = snap.vectors[row:row + 1].astype(np.float32)
    scores, rows = index.search(q, k)
    return _rows_to_frame(index, scores[0], rows[0])


def similar_items(index: ItemIndex, item_id, k: int = 10) -> pl.DataFrame:
    """Items nearest to an item (item-to-item retrieval); the item itself is left out."""
    row = index.row_of(item_id)
    scores, rows = index.search(index.vector(row)[None, :], k + 1)
    keep = rows[0] != row
    return _rows_to_frame(index, scores[0][keep][:k], rows[0][keep][:k])


def top_k_batch(index: ItemIndex, snap: Snapshot, user_ids: list | None, k: int, output: Path,
                chunk: int = 4096) -> dict:
    """Top-k for many users (None: every user in the snapshot) into one Parquet file, one row per (user, rank).
    Unknown ids are not dropped silently: the call fails naming the first few of them."""
    check_compatible(index, snap)
    if user_ids is None:
        rows = np.arange(snap.table.num_rows)
    else:
        table_ids = snap.table.column("user_id").to_pylist()
        pos = {str(u): i for i, u in enumerate(table_ids)}
        missing = [u for u in user_ids if str(u) not in pos]
        if missing:
            raise PinnerformerError(f"{len(missing):,} of {len(user_ids):,} user ids are not in snapshot {snap.path} "
                                    f"(first: {', '.join(map(str, missing[:5]))}); unknown ids, or no action up to "
                                    f"{snap.manifest.as_of}")
        rows = np.array([pos[str(u)] for u in user_ids], dtype=np.int64)
    vecs = snap.vectors
    ids = snap.table.column("user_id").to_numpy(zero_copy_only=False)
    frames = []
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        scores, found = index.search(vecs[r].astype(np.float32), k)
        kk = found.shape[1]
        frames.append(pl.DataFrame({"user_id": np.repeat(ids[r], kk), "rank": np.tile(np.arange(1, kk + 1), len(r)),
                                    "item": found.reshape(-1), "score": scores.reshape(-1)}))
    out = pl.concat(frames) if frames else pl.DataFrame()
    out = out.with_columns(pl.col("rank").cast(pl.Int32), pl.col("item").cast(pl.Int32)).join(
        index.items.select("item", "item_id"), on="item", how="left", maintain_order="left")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        out.write_parquet(tmp)
    return {"users": int(len(rows)), "rows": out.height, "output": str(output)}
