"""A prepared dataset directory, opened: manifest, timelines (memory-mapped), users and items."""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import polars as pl

from pinnerformer.data import schema
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import atomic_path, write_json_atomic
from pinnerformer.data.timelines import Timelines


class DatasetReplaced(PinnerformerError):
    """The dataset's folder was swapped for a new version between reading its manifest and reading a file."""

T = TypeVar("T")


@dataclass
class Dataset:
    path: Path
    manifest: schema.Manifest
    # The folder the manifest was read from, as (device, inode). A writer (`data append`, `data prepare
    # --overwrite`) swaps the whole folder for a new one, which has another inode: every later read checks it still
    # reads that folder, so a manifest of one version never goes with timelines or items of another.
    folder: tuple[int, int] | None = field(default=None, compare=False)

    @staticmethod
    def open(path: str | Path) -> "Dataset":
        path = Path(path)
        for _ in range(20):
            before = folder_identity(path)
            manifest = schema.read_manifest(path)
            if before is not None and folder_identity(path) == before:
                return Dataset(path, manifest, before)
            time.sleep(0.01)  # a swap ran while the manifest was read: read it again from the folder now in place
        raise PinnerformerError(f"{path}: the dataset kept being replaced while its manifest was read (20 tries); "
                                "open it again when the writer (data append / prepare --overwrite) has finished")

    @staticmethod
    def read_stable(path: str | Path, read: "Callable[[Dataset], T]", tries: int = 20) -> T:
        """`read(Dataset.open(path))`, done again on a freshly opened dataset when a writer swaps the folder in while
        it reads: a reader outside the writers' lock (a command's checks before its own append takes the lock,
        `data stats`) then sees one whole version, the old or the new, never an error for someone else's append."""
        for _ in range(tries - 1):
            try:
                return read(Dataset.open(path))
            except DatasetReplaced:
                time.sleep(0.01)
        return read(Dataset.open(path))

    def _same_version(self, what: str) -> None:
        """Raise if the folder was swapped since the manifest was read: `what` may then come from the new version."""
        if self.folder is None:
            return
        now = folder_identity(self.path)
        if now != self.folder:
            raise DatasetReplaced(
                f"{self.path} was replaced (data append or prepare --overwrite) after its manifest was read: "
                f"{what} may come from the new version and the manifest from the old one; open the dataset again")

    @cached_property
    def timelines(self) -> Timelines:
        tl = Timelines.load(self.path / schema.TIMELINES, mmap=True)
        self._same_version("the timelines")  # memory-mapped: once mapped, a later swap cannot change them
        return tl

    @cached_property
    def items(self) -> pl.DataFrame:
        items = read_whole(self.path / schema.ITEMS)
        self._same_version(schema.ITEMS)
        return items

    @cached_property
    def users(self) -> pl.DataFrame:
        users = read_whole(self.path / schema.USERS)
        self._same_version(schema.USERS)
        return users

    def events(self, columns: list[str] | None = None) -> pl.DataFrame:
        ev = read_whole(self.path / schema.EVENTS, columns)
        self._same_version(schema.EVENTS)
        return ev

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


def folder_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None when it stays absent."""
    try:
        st = through_swap(path.stat)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def read_whole(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """A parquet file read from one open of it. A writer (`data append`, `data prepare --overwrite`) swaps the
    dataset's folder in whole while readers run, and polars reading by path opens the file more than once: a swap
    in between mixed one version's footer with the other's pages ("wrong page size"). One open reads one version."""
    return through_swap(lambda: pl.read_parquet(io.BytesIO(path.read_bytes()), columns=columns))


def through_swap(read):
    """`read()`, retried for the instant a swap's two renames leave the folder absent; a 20th miss is the caller's."""
    for _ in range(19):
        try:
            return read()
        except FileNotFoundError:
            time.sleep(0.01)
    return read()


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
