"""A prepared dataset directory, opened: manifest, timelines (memory-mapped), users and items."""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from pinnerformer.data import schema
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import atomic_path, write_json_atomic
from pinnerformer.data.timelines import Timelines


@dataclass
class Dataset:
    path: Path
    manifest: schema.Manifest

    @staticmethod
    def open(path: str | Path) -> "Dataset":
        path = Path(path)
        return Dataset(path, schema.read_manifest(path))

    @cached_property
    def timelines(self) -> Timelines:
        return Timelines.load(self.path / schema.TIMELINES, mmap=True)

    @cached_property
    def items(self) -> pl.DataFrame:
        return read_whole(self.path / schema.ITEMS)

    @cached_property
    def users(self) -> pl.DataFrame:
        return read_whole(self.path / schema.USERS)

    def events(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / schema.EVENTS)

    @property
    def positive_mask(self) -> np.ndarray:
        """Boolean per action code: is it a positive (label) action?"""
        return np.array([a.positive for a in self.manifest.actions], dtype=bool)

    def content_vectors(self) -> np.ndarray | None:
        """[n_items, dim] float32 item content vectors, or None when the dataset has none."""
        if self.manifest.content_vectors is None:
            return None
        col = self.items["content_vector"]
        return np.array(col.list.to_array(self.manifest.content_vectors.dim).to_numpy(), dtype=np.float32)


def read_whole(path: Path) -> pl.DataFrame:
    """A parquet file read from one open of it. A writer (`data append`, `data prepare --overwrite`) swaps the
    dataset's folder in whole while readers run, and polars reading by path opens the file more than once: a swap
    in between mixed one version's footer with the other's pages ("wrong page size"). One open reads one version;
    the swap's two renames leave the folder absent for an instant, which a few short retries wait out."""
    for _ in range(19):
        try:
            return pl.read_parquet(io.BytesIO(path.read_bytes()))
        except FileNotFoundError:
            time.sleep(0.01)
    return pl.read_parquet(io.BytesIO(path.read_bytes()))  # a 20th try, whose error is the caller's


def set_content_vectors(dataset_dir: str | Path, vectors: np.ndarray, model: str, l2_normalised: bool = False,
                        max_tokens: int = 0, items_without_text: int = 0) -> schema.ContentVectors:
    """Store one frozen vector per item (text embeddings, or vectors made elsewhere, e.g. PinSage-like ones) in
    items.parquet and announce them in the manifest. Items first, then the manifest: a crash in between leaves a
    dataset whose manifest does not claim vectors, which is the truth as far as any reader is concerned."""
    ds = Dataset.open(dataset_dir)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != ds.manifest.n_items:
        raise PinnerformerError(f"item vectors of shape {vectors.shape} for {ds.manifest.n_items} items: expected "
                                f"[{ds.manifest.n_items}, dim]")
    if not np.isfinite(vectors).all():
        raise PinnerformerError("item vectors hold NaN or infinite values")
    info = schema.ContentVectors(model=model, dim=vectors.shape[1], l2_normalised=l2_normalised,
                                 max_tokens=max_tokens, items_without_text=items_without_text,
                                 sha256=hashlib.sha256(vectors.tobytes()).hexdigest())
    items = ds.items.drop("content_vector", strict=False).with_columns(
        pl.Series("content_vector", vectors).cast(pl.List(pl.Float32)))
    with atomic_path(Path(dataset_dir) / schema.ITEMS) as tmp:
        items.write_parquet(tmp)
    write_json_atomic(Path(dataset_dir) / schema.MANIFEST, ds.manifest.model_copy(update={"content_vectors": info}))
    return info
