"""A prepared dataset directory, opened: manifest, timelines (memory-mapped), users and items."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from pinnerformer.data import schema
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
        return pl.read_parquet(self.path / schema.ITEMS)

    @cached_property
    def users(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / schema.USERS)

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
