"""The online store behind `pinnerformer serve`: what the service reads and writes per request.

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

    log        every acknowledged event, durably, in append-only segments partitioned by the event's UTC day (an
               entry per ingestion batch and day: JSON with the ids as given, the time received, the client and the
               batch id); written in the same transaction as the realtime lists, never trimmed by the cap. The
               daily job reads it (`serving.event_log.export_log`) to grow the dataset, so events that reach us only
               through the service are in the next day's snapshot and ranking.
    counters   the point-in-time features' view of the same events, partitioned by the event's UTC day and
               written in the same transaction (`counters`, read by `features.online`): per user and per item
               every event (packed records, exact times: the 1/7/30-day windows, recency and the last-n sequence
               are exact at any request time), and the number of all events per action in buckets of a day, an
               hour, a minute and a second (`bucket_names`): the global rates' counts before any second t are the
               sum of at most 1 + 23 + 59 + 59 buckets per day. An exact duplicate of a counted event (same user,
               item, action and second: the dataset keeps one of them too) is not counted again. The service
               reads the days from its day version's end on (the days before are in that version's dataset) and
               drops the older ones on a hand-over (`prune_counters`).

An ingestion batch may carry an id, scoped by the client that sends it: a batch whose (client, id) was applied
within the last `BATCH_WINDOW_S` with the same events is not applied again (a client that retries after a lost
response does not duplicate events); the same (client, id) with different events is a conflict (`BatchConflict`,
409), never a silent drop. Events are packed records (`EVENT`, 20 bytes each).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pinnerformer.data.clock import DAY, day_start_ts, utc_day
from pinnerformer.errors import PinnerformerError

BATCH_WINDOW_S = 7 * 86400  # how long a (client, batch id) is remembered
DEFAULT_CLIENT = "default"

EVENT = np.dtype([("item", "<i4"), ("action", "<i2"), ("surface", "<i2"), ("ts", "<i8"), ("duration", "<f4")])
REALTIME_CAP = 1000  # events kept per user in the realtime list


class StoreUnavailable(PinnerformerError):
    """The store cannot be reached or written (Redis down, disk full): the request fails with 503, not 500."""


class BatchConflict(PinnerformerError):
    """A batch id reused (within the window, by the same client) for different events: 409."""


def batch_digest(batch: dict[str, np.ndarray]) -> bytes:
    """16 bytes that tell two batches' events apart (users in order, every field of every record)."""
    h = hashlib.sha256()
    for user, records in batch.items():
        u = user.encode()
        h.update(len(u).to_bytes(4, "little") + u)
        r = pack(records)
        h.update(len(r).to_bytes(8, "little") + r)
    return h.digest()[:16]


def batch_key(client: str, batch_id: str) -> str:
    return f"{client}\0{batch_id}"


def check_day(day: str) -> str:
    """A log partition: a UTC day, YYYY-MM-DD."""
    try:
        dt.date.fromisoformat(day)
    except (TypeError, ValueError):
        raise PinnerformerError(f"event log partition {day!r}: expected a day YYYY-MM-DD") from None
    return day


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


@dataclass
class Counters:
    """The feature counters from a day on (`OnlineStore.counters`), read together."""

    users: dict[str, np.ndarray]  # user -> EVENT records, in arrival order (each counted event once)
    items: np.ndarray  # EVENT records of every user on the items asked for, day by day, item by item
    before: np.ndarray  # [times, actions] int64: the number of all events before each time, per action


@lru_cache(maxsize=64)
def day_name(day: int) -> str:
    """YYYY-MM-DD of a day number (Unix seconds // DAY)."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def bucket_names(ts: int) -> tuple[str, list[str]]:
    """An event's day partition and the global buckets it counts in: its day, hour, minute and second."""
    off = ts % DAY
    h, m, s = off // 3600, off % 3600 // 60, off % 60
    return day_name(ts // DAY), ["d", f"h{h:02d}", f"m{h:02d}{m:02d}", f"s{h:02d}{m:02d}{s:02d}"]


def buckets_before(day: str, t: int) -> list[str]:
    """The buckets of a day partition whose sum is the number of its events before t: the whole day, or its
    hours before t's, then t's hour's minutes before t's, then t's minute's seconds before t's."""
    off = t - day_start_ts(dt.date.fromisoformat(day))
    if off <= 0:
        return []
    if off >= DAY:
        return ["d"]
    h, m, s = off // 3600, off % 3600 // 60, off % 60
    return ([f"h{i:02d}" for i in range(h)] + [f"m{h:02d}{i:02d}" for i in range(m)]
            + [f"s{h:02d}{m:02d}{i:02d}" for i in range(s)])


def counter_range(since: int, times: list[int]) -> tuple[str, str] | None:
    """The first and last day partition that can hold events in [since, t) for some t of `times` (None: none);
    a store reads the days it has between them (those with events), not every day of the range."""
    if not len(times) or max(times) <= since:
        return None
    return utc_day(since).isoformat(), utc_day(max(times) - 1).isoformat()


def counter_rows(batch: dict[str, np.ndarray]):
    """Per event of a batch, for the counters: (user, day partition, global buckets, item, action, time, the packed
    record)."""
    size = EVENT.itemsize
    for user, records in batch.items():
        r = np.ascontiguousarray(records, EVENT)
        raw = r.tobytes()
        for k, (item, action, ts) in enumerate(zip(r["item"].tolist(), r["action"].tolist(), r["ts"].tolist())):
            day, names = bucket_names(ts)
            yield user, day, names, item, action, ts, raw[k * size:(k + 1) * size]


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
    def append(self, batch: dict[str, np.ndarray], batch_id: str | None = None, *, client: str = DEFAULT_CLIENT,
               log: dict[str, bytes] | None = None) -> int:
        """Append each user's records (EVENT) to their realtime list, the `log` entries ({day: entry}) to the
        event log and the events to the counters, all at once or none; returns the number of events appended (0
        when (`client`, `batch_id`) was applied before with the same events; BatchConflict when with other
        events)."""

    def check_log_id(self, entry_id: str) -> str:
        """A log entry id as `read_log` gives them (ValueError otherwise)."""
        if not (entry_id.isascii() and entry_id.isdigit() and int(entry_id) < 2 ** 63):
            raise ValueError(f"not a log entry id: {entry_id!r}")
        return entry_id

    @abstractmethod
    def log_days(self) -> list[str]:
        """The event log's partitions (UTC days, sorted)."""

    @abstractmethod
    def read_log(self, day: str, after: str | None = None) -> list[tuple[str, bytes]]:
        """The log entries of partition `day` after the entry id `after` (all when None), in append order, as (id,
        entry); ids compare in append order within a partition, as `after` expects."""

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
    def counters(self, since: int, users: list[str], items: list[int], times: list[int], n_actions: int
                 ) -> Counters:
        """The feature counters of the events from `since` (a UTC midnight) on, for these users and items, and the
        global counts before each of `times`; read as one snapshot."""

    @abstractmethod
    def prune_counters(self, before: int) -> list[str]:
        """Drop the counters of the days before `before` (a UTC midnight); returns those days."""

    @abstractmethod
    def event_count(self) -> int:
        """Events appended since the store was created."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot serve."""

    def close(self) -> None:
        pass
