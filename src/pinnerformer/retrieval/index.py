"""Item embeddings from a run's item tower in a FAISS index, saved with its id map and manifest.

    INDEX_DIR/
        index.faiss     the FAISS index; row r of the index is dataset item r
        items.parquet   item:int32 (dataset index, = index row)  item_id  text (title, for display)
        manifest.json   kind + parameters, dim, count, checkpoint hash, dataset fingerprint, build time, and the
                        recall@k of the index against exact search measured at build time

Vectors are L2-normalised, so inner product = cosine, the score the model was trained with. Kinds:
    flat   exact inner-product search (the reference)
    hnsw   graph search (Pinterest's choice): M links per node, efConstruction at build, efSearch at query
    ivf    inverted lists over k-means cells: nlist cells, nprobe visited per query
The directory is written under a temporary name and renamed, so a half-built index is never visible.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from pinnerformer.config import StrictModel
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.inference.snapshot import CheckpointRef
from pinnerformer.io import atomic_dir, file_sha256, read_json_record, write_json_atomic
from pinnerformer.models.embedding import embed_items
from pinnerformer.runs.run_dir import RunDir

KINDS = ("hnsw", "flat", "ivf")
DEFAULTS = {"hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
            "ivf": {"nlist": None, "nprobe": None},  # None: nlist ~ 4*sqrt(n), nprobe ~ max(8, nlist/32)
            "flat": {}}


class IndexManifest(StrictModel):
    kind: Literal["hnsw", "flat", "ivf"]
    params: dict[str, Any]
    metric: str
    dim: int
    items: int
    checkpoint: CheckpointRef
    dataset: DatasetRef
    embed_s: float
    build_s: float
    recall_vs_exact: float  # recall@recall_k of the index against exact search, measured at build time
    recall_k: int
    recall_queries: str
    created_at: str
    index_sha256: str | None = None  # of index.faiss, checked when the index is opened


def _faiss():
    import faiss

    return faiss


def resolve_params(kind: str, n: int, params: dict | None = None) -> dict:
    if kind not in KINDS:
        raise PinnerformerError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
    p = dict(DEFAULTS[kind], **(params or {}))
    unknown = set(p) - set(DEFAULTS[kind])
    if unknown:
        raise PinnerformerError(f"{kind} index: unknown parameter(s) {', '.join(sorted(unknown))} "
                                f"(expected {', '.join(DEFAULTS[kind]) or 'none'})")
    if kind == "ivf":
        p["nlist"] = int(p["nlist"] or max(1, min(n // 39, int(4 * np.sqrt(n)))))  # >= 39 training points per cell
        p["nprobe"] = int(p["nprobe"] or min(p["nlist"], max(8, p["nlist"] // 32)))
    return p


def build_faiss_index(vectors: np.ndarray, kind: str, params: dict | None = None, seed: int = 0,
                      train_size: int | None = None, on_added=None):
    """An inner-product FAISS index over `vectors` ([n, d] float32); returns (index, resolved params).

    train_size: IVF k-means on a seeded sample of this many vectors (default: all). on_added(n): called after
    each chunk of 50,000 vectors is added (progress for large builds; the index is the same as one add)."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    p = resolve_params(kind, n, params)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = x if not train_size or train_size >= n else \
            x[np.random.default_rng(seed).choice(n, train_size, replace=False)]
        index.train(sample)
    for i in range(0, n, 50_000):
        index.add(x[i:i + 50_000])
        if on_added:
            on_added(min(50_000, n - i))
    set_search_params(index, kind, p)
    return index, p


def set_search_params(index, kind: str, p: dict) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = p["ef_search"]
    elif kind == "ivf":
        index.nprobe = p["nprobe"]


def exact_top_k(items: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Exact top-k rows by inner product (FAISS flat search), [q, k]."""
    faiss = _faiss()
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(np.ascontiguousarray(items, dtype=np.float32))
    out = [flat.search(np.ascontiguousarray(queries[i:i + chunk], dtype=np.float32), k)[1]
           for i in range(0, len(queries), chunk)]
    return np.concatenate(out)


def recall_vs_exact(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k that the approximate top-k contains."""
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(f, e)) / k for f, e in zip(found, exact)]))


@dataclass
class ItemIndex:
    path: Path
    index: object
    items: pl.DataFrame
    manifest: IndexManifest

    @staticmethod
    def open(path: str | Path) -> "ItemIndex":
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise PinnerformerError(f"{path}: not an item index (no manifest.json; build one with "
                                    "`pinnerformer index`)")
        try:
            manifest = IndexManifest.model_validate(read_json_record(path / "manifest.json", "index manifest"))
        except ValueError as e:
            raise PinnerformerError(f"{path / 'manifest.json'}: not an index manifest this version can read: {e}") \
                from None
        if manifest.index_sha256 is not None and file_sha256(path / "index.faiss") != manifest.index_sha256:
            raise PinnerformerError(f"{path / 'index.faiss'} does not match its manifest's hash (damaged or "
                                    "replaced): build the index again")
        try:
            index = _faiss().read_index(str(path / "index.faiss"))
        except RuntimeError as e:
            raise PinnerformerError(f"{path / 'index.faiss'} cannot be read ({str(e).splitlines()[0][:160]}): "
                                    "build the index again") from None
        set_search_params(index, manifest.kind, manifest.params)
        if manifest.kind == "ivf":
            index.make_direct_map()  # IVF lists do not keep row -> vector without it (needed by `vector`)
        return ItemIndex(path, index, pl.read_parquet(path / "items.parquet"), manifest)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k'], item rows [q, k']) with k' = min(k, items in the index): always k' real items. HNSW
        searches with efSearch >= k (below it the graph search returns fewer than k); an IVF query whose probed
        lists hold fewer than k items is searched again over every list."""
        k = min(k, self.index.ntotal)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.manifest.kind == "hnsw":
            self.index.hnsw.efSearch = max(int(self.manifest.params["ef_search"]), k)
        scores, rows = self.index.search(q, k)
        short = (rows < 0).any(1)
        if short.any() and self.manifest.kind == "ivf":
            self.index.nprobe = self.index.nlist
            scores[short], rows[short] = self.index.search(q[short], k)
            self.index.nprobe = int(self.manifest.params["nprobe"])
        if (rows < 0).any():
            raise PinnerformerError(f"index {self.path} returned fewer than {k} items for a query")
        return scores, rows

    def row_of(self, item_id) -> int:
        ids = self.items["item_id"]
        try:
            key = pl.Series([item_id]).cast(ids.dtype, strict=True)[0]
        except Exception:
            raise PinnerformerError(f"item id {item_id!r} is not a valid {ids.dtype} id") from None
        rows = np.flatnonzero((ids == key).to_numpy())
        if len(rows) == 0:
            raise PinnerformerError(f"item {item_id!r} is not in index {self.path} ({len(ids):,} items)")
        return int(rows[0])

    def vector(self, row: int) -> np.ndarray:
        return self.index.reconstruct(row)


def build_item_index(run_dir: Path, ds: Dataset, output: Path, kind: str = "hnsw", params: dict | None = None,
                     checkpoint: str = "best", log=print, overwrite: bool = False) -> IndexManifest:
    """overwrite: replace an existing index at `output` (by renames); without it an existing one is refused."""
    t0 = time.perf_counter()
    p = resolve_params(kind, ds.manifest.n_items, params)  # bad parameters fail before any work
    output = Path(output)
    if output.exists() and not overwrite and (output / "manifest.json").exists():
        raise PinnerformerError(f"{output} already holds an item index: use --overwrite to replace it, or another "
                                "--output")
    run = RunDir(run_dir)
    vecs = embed_items(run.load_model(ds, checkpoint), torch.device("cpu")).numpy()
    t_embed = time.perf_counter() - t0
    index, p = build_faiss_index(vecs, kind, params)
    t_build = time.perf_counter() - t0 - t_embed
    # Quality at build time: the item vectors themselves as queries (a sample), against exact search.
    rng = np.random.default_rng(0)
    sample = vecs[rng.choice(len(vecs), min(1000, len(vecs)), replace=False)]
    k = min(10, len(vecs))
    recall = recall_vs_exact(index.search(sample, k)[1], exact_top_k(vecs, sample, k))
    output = Path(output)
    if output.exists() and not (output / "manifest.json").exists():
        raise PinnerformerError(f"{output} exists and is not an item index: refusing to replace it")
    manifest = IndexManifest(
        kind=kind, params=p, metric="inner product (vectors L2-normalised)", dim=int(vecs.shape[1]),
        items=int(len(vecs)),
        checkpoint=CheckpointRef(run=str(run.path.resolve()), name=checkpoint, sha256=run.checkpoint_sha256(checkpoint)),
        dataset=DatasetRef(path=str(Path(ds.path).resolve()), fingerprint=ds.manifest.fingerprint),
        embed_s=round(t_embed, 3), build_s=round(t_build, 3), recall_vs_exact=round(recall, 4), recall_k=k,
        recall_queries=f"{len(sample)} item vectors (seed 0)",
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    with atomic_dir(output) as tmp:
        _faiss().write_index(index, str(tmp / "index.faiss"))
        manifest.index_sha256 = file_sha256(tmp / "index.faiss")
        ds.items.select("item", "item_id", *(["text"] if "text" in ds.items.columns else [])).write_parquet(
            tmp / "items.parquet")
        write_json_atomic(tmp / "manifest.json", manifest)
    log(f"wrote {output}: {kind} {p} over {len(vecs):,} items (dim {vecs.shape[1]}); built in {t_build:.2f}s; "
        f"recall@{k} vs exact {recall:.4f} on {len(sample)} item queries")
    return manifest
