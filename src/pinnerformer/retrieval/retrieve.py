"""Candidate retrieval: a user's snapshot vector (or an item's vector) against the item index.

The snapshot and the index must come from the same checkpoint: user and item towers are trained together, and
a user vector from one model means nothing in another model's item space. By default the items a user already
acted on (up to the snapshot's as-of day, from the snapshot's dataset) are left out of their recommendations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel

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


class SeenItems:
    """The items each snapshot user acted on before the snapshot's cut-off, from the snapshot's dataset (or a
    dataset grown from it: indexes are the same)."""

    def __init__(self, snap: Snapshot, dataset: Path | None = None):
        from pinnerformer.data.dataset import Dataset

        m = snap.manifest
        self.ds = Dataset.open(dataset or m.dataset.path)
        if not self.ds.manifest.descends_from(m.dataset.fingerprint):
            raise PinnerformerError(f"{self.ds.path} is not the dataset snapshot {snap.path} was made from (nor grown "
                                    "from it): pass the right --dataset, or --include-seen")
        self.snap, self.before = snap, m.inputs_before_ts

    def of(self, row: int) -> np.ndarray:
        tl = self.ds.timelines
        u = int(self.snap.users[row])
        s, e = int(tl.offsets[u]), int(tl.offsets[u + 1])
        e = s + int(np.searchsorted(tl.ts[s:e], self.before, side="left"))
        return np.unique(np.asarray(tl.item[s:e]))


def search_unseen(index: ItemIndex, queries: np.ndarray, k: int, seen: list[np.ndarray] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per query leaving out each query's seen items: searches k + the most seen, then filters. Rows that
    run out of unseen items (a user who saw nearly everything) are padded with -1 and score -inf."""
    if seen is None:
        return index.search(queries, k)
    extra = max((len(x) for x in seen), default=0)
    scores, rows = index.search(queries, k + extra)
    k = min(k, index.index.ntotal)
    out_s, out_r = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    for i, s in enumerate(seen):
        keep = ~np.isin(rows[i], s)
        n = min(k, int(keep.sum()))
        out_s[i, :n], out_r[i, :n] = scores[i][keep][:n], rows[i][keep][:n]
    return out_s, out_r


def top_k_for_user(index: ItemIndex, snap: Snapshot, user_id, k: int = 10, seen: SeenItems | None = None
                   ) -> pl.DataFrame:
    """seen: leave out the user's own items (None: keep them)."""
    check_compatible(index, snap)
    row = snap.lookup(user_id)
    q = snap.vectors[row:row + 1].astype(np.float32)
    scores, rows = search_unseen(index, q, k, None if seen is None else [seen.of(row)])
    return _rows_to_frame(index, scores[0], rows[0])


def similar_items(index: ItemIndex, item_id, k: int = 10) -> pl.DataFrame:
    """Items nearest to an item (item-to-item retrieval); the item itself is left out."""
    row = index.row_of(item_id)
    scores, rows = index.search(index.vector(row)[None, :], k + 1)
    keep = rows[0] != row
    return _rows_to_frame(index, scores[0][keep][:k], rows[0][keep][:k])


class BatchTopK(BaseModel):
    """What `top_k_batch` wrote: a Parquet file of (user_id, rank, item, score, item_id)."""

    output: str
    users: int
    rows: int
    users_short_of_k: int  # users with fewer than k unseen items in the whole index


def top_k_batch(index: ItemIndex, snap: Snapshot, user_ids: list | None, k: int, output: Path,
                chunk: int = 4096, seen: SeenItems | None = None) -> BatchTopK:
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
    frames, short = [], 0  # short: users with fewer than k unseen items in the whole index
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        scores, found = search_unseen(index, vecs[r].astype(np.float32), k,
                                      None if seen is None else [seen.of(int(x)) for x in r])
        kk = found.shape[1]
        frames.append(pl.DataFrame({"user_id": np.repeat(ids[r], kk), "rank": np.tile(np.arange(1, kk + 1), len(r)),
                                    "item": found.reshape(-1), "score": scores.reshape(-1)}).filter(pl.col("item") >= 0))
        short += int((found < 0).any(1).sum())
    out = pl.concat(frames) if frames else pl.DataFrame()
    out = out.with_columns(pl.col("rank").cast(pl.Int32), pl.col("item").cast(pl.Int32)).join(
        index.items.select("item", "item_id"), on="item", how="left", maintain_order="left")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        out.write_parquet(tmp)
    return BatchTopK(users=int(len(rows)), rows=out.height, output=str(output), users_short_of_k=short)
