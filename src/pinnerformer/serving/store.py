"""The online store behind `pinnerformer serve` (SPEC §7): what the service reads and writes per request.

    realtime   per user, the newest `realtime_cap` events the service ingested, in arrival order (a capped list):
               written before an ingestion is acknowledged, visible to the very next read (read-your-writes)
    daily      per day version: each user's named embeddings (e.g. "retrieval": the PinnerFormer vector the ANN
               index is queried with, "ranking": the ranker's PinnerFormer feature) and lifelong sequence blob (what
               the daily job published), and one pointer to the current version, switched atomically (`publish`)

Two backends pass the same tests (`tests/test_store.py`):
    LmdbStore   embedded, no server (the default; `lmdb:///path` or a plain path); every write is one
                transaction, synced to disk before it returns
    RedisStore  production (`redis://host:port/db`); a batch of events is one Lua script, so it is applied
                whole or not at all; durable across a Redis crash with `appendfsync always` (our start script,
                `scripts/redis.sh`, sets it)

An ingestion batch may carry an id: a batch whose id was already applied is not applied again (a client that
retries after a lost response does not duplicate events). Events are packed records (`EVENT`, 20 bytes each).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from pinnerformer.errors import PinnerformerError

EVENT = np.dtype([("item", "<i4"), ("action", "<i2"), ("surface", "<i2"), ("ts", "<i8"), ("duration", "<f4")])
REALTIME_CAP = 1000  # events kept per user in the realtime list


class StoreUnavailable(PinnerformerError):
    """The store cannot be reached or written (Redis down, disk full): the request fails with 503, not 500."""


def events(item, action, ts, surface=None, duration=None) -> np.ndarray:
    """Packed event records from columns (surface -1: none; duration NaN: unknown)."""
    n = len(item)
    out = np.zeros(n, EVENT)
    out["item"], out["action"], out["ts"] = item, action, ts
    out["surface"] = -1 if surface is None else surface
    out["duration"] = np.nan if duration is None else duration
    return out


def pack(records: np.ndarray) -> bytes:
    return np.ascontiguousarray(records, dtype=EVENT).tobytes()


def unpack(blob: bytes | None) -> np.ndarray:
    if not blob:
        return np.zeros(0, EVENT)
    if len(blob) % EVENT.itemsize:
        raise PinnerformerError(f"a stored event list of {len(blob)} bytes is not a whole number of "
                                f"{EVENT.itemsize}-byte records: the store is damaged")
    return np.frombuffer(blob, EVENT).copy()


def vector_layout(users: list[str], vectors: dict[str, np.ndarray]) -> dict[str, int]:
    """{name: width} of one version's named embeddings (a row of NaN: the user has none of that name)."""
    for name, v in vectors.items():
        if v.ndim != 2 or len(v) != len(users):
            raise PinnerformerError(f"put_daily: {len(users)} users for {len(v)} '{name}' vectors")
    return {name: int(v.shape[1]) for name, v in vectors.items()}


def pack_vectors(vectors: dict[str, np.ndarray]) -> np.ndarray:
    """[U, sum of widths] float32: one row of bytes per user, the names in layout order."""
    return np.ascontiguousarray(np.concatenate([np.asarray(v, np.float32) for v in vectors.values()], 1))


def unpack_vectors(blob: bytes | None, layout: dict[str, int]) -> dict[str, np.ndarray]:
    if not blob:
        return {}
    row, out, at = np.frombuffer(blob, np.float32), {}, 0
    for name, width in layout.items():
        v = row[at:at + width]
        at += width
        if not np.isnan(v).any():
            out[name] = v.copy()
    return out


def check_version(version: str) -> str:
    if not version or any(c in version for c in "\0:/ ") or len(version) > 64:
        raise PinnerformerError(f"store version {version!r}: expected a short name without spaces, ':', '/' or NUL "
                                "(a day, e.g. 2026-11-26)")
    return version


class OnlineStore(ABC):
    url: str
    realtime_cap: int

    @abstractmethod
    def append(self, batch: dict[str, np.ndarray], batch_id: str | None = None) -> int:
        """Append each user's records (EVENT) to their realtime list, all users at once or none; returns the
        number of events appended (0 when `batch_id` was applied before)."""

    @abstractmethod
    def realtime(self, user: str) -> np.ndarray:
        """The user's realtime list, in arrival order (at most `realtime_cap`)."""

    @abstractmethod
    def put_daily(self, version: str, users: list[str], vectors: dict[str, np.ndarray],
                  lifelong: dict[str, np.ndarray] | None = None) -> None:
        """Write one day version's named embeddings ({name: [U, d]}) and lifelong blobs; readers see it only after
        `publish`."""

    @abstractmethod
    def publish(self, version: str) -> None:
        """Make `version` the current daily version (atomically; it must have been written)."""

    @abstractmethod
    def current_version(self) -> str | None: ...

    @abstractmethod
    def versions(self) -> list[str]: ...

    @abstractmethod
    def drop_version(self, version: str) -> None:
        """Delete an old day version (never the current one)."""

    @abstractmethod
    def daily(self, user: str, version: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The user's named embeddings ({} when the version has none for them) and lifelong records in `version`
        (default: the current one)."""

    @abstractmethod
    def event_count(self) -> int:
        """Events appended since the store was created."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot serve."""

    def close(self) -> None:
        pass
