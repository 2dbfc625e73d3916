"""Per-user timelines: the one in-memory structure every later stage reads.

Events sorted by (user, time) are stored as flat columnar numpy arrays; user u owns the half-open range
offsets[u] : offsets[u + 1]. Arrays can be memory-mapped from the dataset's `timelines/` folder, so a
worker process touches only the pages it reads.

A `TimelineView` restricts every user to a sub-range [start[u], end[u]) of their events without copying
event data: "each user's timeline as of time t" is `timelines.as_of(t)`, and leave-one-out splits are
`timelines.drop_last(k)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pinnerformer.errors import PinnerformerError

COLUMNS = {"item": np.int32, "action": np.int16, "ts": np.int64, "surface": np.int16, "duration": np.float32}
NO_SURFACE = -1  # surface code for "not recorded"; duration uses NaN


class Timeline(NamedTuple):
    """One user's events (numpy views into the shared arrays, oldest first)."""

    item: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    surface: np.ndarray
    duration: np.ndarray

    def __len__(self) -> int:
        return len(self.item)


@dataclass(frozen=True)
class Timelines:
    offsets: np.ndarray  # int64 [n_users + 1]
    item: np.ndarray  # int32 [n_events]
    action: np.ndarray  # int16
    ts: np.ndarray  # int64: seconds since epoch, or position when clock == "order"
    surface: np.ndarray  # int16, NO_SURFACE when unknown
    duration: np.ndarray  # float32 seconds, NaN when unknown
    clock: str = "seconds"

    def __post_init__(self):
        n = int(self.offsets[-1])
        if self.offsets[0] != 0 or any(len(getattr(self, c)) != n for c in COLUMNS):
            raise ValueError("timeline arrays do not match their offsets")

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> Timeline:
        a, b = int(self.offsets[u]), int(self.offsets[u + 1])
        return Timeline(*(getattr(self, c)[a:b] for c in COLUMNS))

    def user_of_event(self) -> np.ndarray:
        """User index of every event (allocates n_events int32; for vectorised work)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int32), self.lengths)

    # ---- views ---------------------------------------------------------------------------------------
    def full(self) -> "TimelineView":
        return TimelineView(self, self.offsets[:-1].copy(), self.offsets[1:].copy())

    def as_of(self, t: int | np.ndarray) -> "TimelineView":
        """Every user's events strictly before time t (a scalar, or one cut-off per user)."""
        if self.clock != "seconds":
            raise PinnerformerError(
                "this dataset has no real clock (order-only input): a time cut-off is meaningless here; "
                "use position-based views such as drop_last(k)")
        return self.full().before(t)

    def drop_last(self, k: int) -> "TimelineView":
        """Every user's timeline without its last k events (leave-one-out: k=2 train, k=1 validation)."""
        return self.full().drop_last(k)

    # ---- storage -------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "offsets.npy", np.ascontiguousarray(self.offsets, dtype=np.int64))
        for c, dtype in COLUMNS.items():
            np.save(folder / f"{c}.npy", np.ascontiguousarray(getattr(self, c), dtype=dtype))
        (folder / "clock.txt").write_text(self.clock + "\n")

    @staticmethod
    def load(folder: Path, mmap: bool = True) -> "Timelines":
        mode = "r" if mmap else None
        arrays = {c: np.load(folder / f"{c}.npy", mmap_mode=mode) for c in ["offsets", *COLUMNS]}
        return Timelines(**arrays, clock=(folder / "clock.txt").read_text().strip())

    def content_hash(self) -> "hashlib._Hash":
        h = hashlib.sha256()
        h.update(self.clock.encode())
        for c in ["offsets", *COLUMNS]:
            a = np.ascontiguousarray(getattr(self, c))
            h.update(f"{c}:{a.dtype.str}:{a.shape}".encode())
            # hash in chunks: a memory-mapped array is read once, without a full in-memory copy
            flat = a.reshape(-1).view(np.uint8)
            for i in range(0, len(flat), 1 << 26):
                h.update(flat[i:i + (1 << 26)])
        return h


@dataclass(frozen=True)
class TimelineView:
    """Each user restricted to events [start[u], end[u]) of the shared arrays. No event data is copied."""

    base: Timelines
    start: np.ndarray  # int64 [n_users]
    end: np.ndarray  # int64 [n_users]

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.start

    def user(self, u: int) -> Timeline:
        a, b = int(self.start[u]), int(self.end[u])
        return Timeline(*(getattr(self.base, c)[a:b] for c in COLUMNS))

    def active_users(self, min_events: int = 1) -> np.ndarray:
        return np.flatnonzero(self.lengths >= min_events)

    def before(self, t: int | np.ndarray) -> "TimelineView":
        """Keep events with ts < t; t is a scalar or one cut-off per user. O(n_events), one bool temp."""
        ts = self.base.ts
        lengths = self.base.lengths
        t_event = t if np.ndim(t) == 0 else np.repeat(np.asarray(t, dtype=np.int64), lengths)
        # Within a user ts is sorted, so the number of events before t is the new end offset.
        counts = np.add.reduceat((ts < t_event).astype(np.int64), self.base.offsets[:-1]) if len(ts) else \
            np.zeros(self.base.n_users, np.int64)
        counts[lengths == 0] = 0  # reduceat returns a neighbour's value for empty segments
        end = np.minimum(self.end, self.base.offsets[:-1] + counts)
        return TimelineView(self.base, self.start, np.maximum(end, self.start))

    def drop_last(self, k: int) -> "TimelineView":
        return TimelineView(self.base, self.start, np.maximum(self.end - k, self.start))

    def last(self, n: int) -> "TimelineView":
        """Only the n most recent events of each user in this view (the model's input window)."""
        return TimelineView(self.base, np.maximum(self.end - n, self.start), self.end)
