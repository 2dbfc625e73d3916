"""The embedded online store: LMDB (a memory-mapped B+tree in one directory, no server). Every write is one
transaction, synced before it returns, so an acknowledged write survives a kill -9 of the process; readers never
see a half-applied batch. Layout (named databases):

    realtime   user -> the packed events of the realtime list (at most realtime_cap, the newest)
    daily      "<version>\\0<user>" -> the float32 embeddings, concatenated in the version's layout
    lifelong   "<version>\\0<user>" -> packed events
    batches    "<client>\\0<batch id>" -> the batch's digest (16 bytes) + when it was applied (int64 Unix s)
    log        "<day>\\0<sequence, 8 bytes big-endian>" -> a log entry (JSON); the sequence only grows
    meta       "current" -> version; "events" -> int64 count; "log_seq" -> int64; "version:<version>" -> the layout,
               JSON {name: width}
    counters   "<day>\\0u<user>" -> the packed events of the user that day; "<day>\\0i<item, 4 bytes big-endian>" ->
               the item's; "<day>\\0g<bucket>" -> int64 counts per action; "<day>\\0s<item><time><action><user>" -> ""
               (the events counted: a duplicate is not counted again)
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections import defaultdict
from pathlib import Path

import lmdb
import numpy as np

from pinnerformer.data.clock import utc_day
from pinnerformer.errors import PinnerformerError
from pinnerformer.serving.store import (
    BATCH_WINDOW_S, DEFAULT_CLIENT, EVENT, REALTIME_CAP, BatchConflict, Counters, OnlineStore, StoreUnavailable,
    batch_digest, batch_key, buckets_before, check_day, check_version, counter_range, counter_rows, pack, pack_vectors,
    unpack, unpack_vectors, vector_layout,
)

MAP_SIZE = 8 << 30  # address space only: the file grows with the data (sparse)


def sum_buckets(days: list[str], times: list[int], n_actions: int, read) -> np.ndarray:
    """[times, actions]: the events before each time, from `read(day, names)` -> {bucket: int64 counts per action}
    (absent: none)."""
    out = np.zeros((len(times), n_actions), np.int64)
    for day in days:
        wanted = {t: buckets_before(day, t) for t in times}
        got = read(day, sorted({n for names in wanted.values() for n in names}))
        for i, t in enumerate(times):
            for name in wanted[t]:
                c = got.get(name)
                if c is not None:
                    out[i, :min(len(c), n_actions)] += c[:n_actions]
    return out


class LmdbStore(OnlineStore):
    def __init__(self, path: str | Path, realtime_cap: int = REALTIME_CAP, map_size: int = MAP_SIZE):
        self.path = Path(path)
        self.url = f"lmdb://{self.path}"
        self.realtime_cap = realtime_cap
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=8, subdir=True, sync=True,
                                 metasync=True)
        except lmdb.Error as e:
            raise StoreUnavailable(f"{self.path}: cannot open the LMDB store: {e}") from None
        self.db = {name: self.env.open_db(name.encode()) for name in ("realtime", "daily", "lifelong", "batches",
                                                                      "log", "meta", "counters")}

    def _write(self, fn):
        try:
            with self.env.begin(write=True) as txn:
                return fn(txn)
        except lmdb.MapFullError:
            raise StoreUnavailable(f"{self.path}: the LMDB store is full (map size {self.env.info()['map_size']:,} "
                                   "bytes): open it with a larger map_size") from None
        except lmdb.Error as e:
            raise StoreUnavailable(f"{self.path}: LMDB write failed: {e}") from None

    def append(self, batch: dict[str, np.ndarray], batch_id: str | None = None, *, client: str = DEFAULT_CLIENT,
               log: dict[str, bytes] | None = None) -> int:
        digest = batch_digest(batch) if batch_id is not None else b""
        for day in log or {}:
            check_day(day)

        def apply(txn) -> int:
            now = int(time.time())
            if batch_id is not None:
                key = batch_key(client, batch_id).encode()
                if len(key) > 256:  # LMDB keys hold at most 511 bytes: a long one by its digest
                    key = b"sha256:" + hashlib.sha256(key).digest()
                seen = txn.get(key, db=self.db["batches"])
                if seen is not None and now - int.from_bytes(seen[16:24], "little") < BATCH_WINDOW_S:
                    if seen[:16] == digest:
                        return 0
                    raise BatchConflict(f"batch_id {batch_id!r} of client {client!r} was applied with other events "
                                        "(ids are kept for 7 days): give this batch an id of its own")
                txn.put(key, digest + now.to_bytes(8, "little"), db=self.db["batches"])
            n = 0
            for user, records in batch.items():
                key = user.encode()
                old = unpack(txn.get(key, db=self.db["realtime"]))
                new = np.concatenate([old, np.asarray(records, EVENT)])[-self.realtime_cap:]
                txn.put(key, pack(new), db=self.db["realtime"])
                n += len(records)
            count = int.from_bytes(txn.get(b"events", default=b"\0" * 8, db=self.db["meta"]), "little")
            txn.put(b"events", (count + n).to_bytes(8, "little"), db=self.db["meta"])
            seq = int.from_bytes(txn.get(b"log_seq", default=b"\0" * 8, db=self.db["meta"]), "little")
            for day, entry in sorted((log or {}).items()):
                seq += 1
                txn.put(day.encode() + b"\0" + seq.to_bytes(8, "big"), entry, db=self.db["log"])
            txn.put(b"log_seq", seq.to_bytes(8, "little"), db=self.db["meta"])
            self._count(txn, batch)
            return n

        return self._write(apply)

    def _count(self, txn, batch: dict[str, np.ndarray]) -> None:
        """The batch's events into the counters (inside append's transaction), each distinct event once."""
        db = self.db["counters"]
        lists: dict[bytes, list] = defaultdict(list)
        buckets: dict[bytes, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for user, day, names, item, a, ts, record in counter_rows(batch):
            d, u, i = day.encode() + b"\0", user.encode(), item.to_bytes(4, "big")
            if not txn.put(d + b"s" + i + struct.pack(">qh", ts, a) + u, b"", db=db, overwrite=False):
                continue  # counted before
            lists[d + b"u" + u].append(record)
            lists[d + b"i" + i].append(record)
            for name in names:
                buckets[d + b"g" + name.encode()][a] += 1
        for key, records in lists.items():
            txn.put(key, (txn.get(key, db=db) or b"") + b"".join(records), db=db)
        for key, add in buckets.items():
            c = np.frombuffer(txn.get(key, db=db) or b"", "<i8")
            c = np.concatenate([c, np.zeros(max(0, max(add) + 1 - len(c)), np.int64)])
            for a, k in add.items():
                c[a] += k
            txn.put(key, c.tobytes(), db=db)

    def counters(self, since: int, users: list[str], items: list[int], times: list[int], n_actions: int
                 ) -> Counters:
        span, db = counter_range(since, times), self.db["counters"]
        with self.env.begin() as txn:  # one snapshot
            days, cur = [], txn.cursor(db=db)
            found = span is not None and cur.set_range(span[0].encode())
            while found and (day := cur.key().split(b"\0", 1)[0]) <= span[1].encode():  # one seek per day held
                days.append(day.decode())
                found = cur.set_range(day + b"\1")

            def read(prefix: bytes, keys: list[bytes]) -> np.ndarray:
                return unpack(b"".join(txn.get(d.encode() + b"\0" + prefix + k, db=db) or b"" for d in days
                                       for k in keys))

            def buckets(day: str, names: list[str]) -> dict[str, np.ndarray]:
                got = {n: txn.get(f"{day}\0g{n}".encode(), db=db) for n in names}
                return {n: np.frombuffer(v, "<i8") for n, v in got.items() if v is not None}

            return Counters({u: read(b"u", [u.encode()]) for u in users},
                            read(b"i", [int(i).to_bytes(4, "big") for i in items]),
                            sum_buckets(days, list(times), n_actions, buckets))

    def prune_counters(self, before: int) -> list[str]:
        last = utc_day(before - 1).isoformat().encode()  # the last day dropped
        dropped: list[str] = []

        def apply(txn) -> None:
            cur = txn.cursor(db=self.db["counters"])
            found = cur.first()
            while found and cur.key().split(b"\0", 1)[0] <= last:
                day = cur.key().split(b"\0", 1)[0].decode()
                if not dropped or dropped[-1] != day:
                    dropped.append(day)
                found = cur.delete()  # moves to the next key
                found = found and cur.key() != b""

        self._write(apply)
        return dropped

    def log_days(self) -> list[str]:
        with self.env.begin() as txn:
            cur, days = txn.cursor(db=self.db["log"]), []
            found = cur.first()
            while found:  # one seek per day, not a walk over every entry
                day = cur.key().split(b"\0", 1)[0]
                days.append(day.decode())
                found = cur.set_range(day + b"\1")
        return days

    def read_log(self, day: str, after: str | None = None) -> list[tuple[str, bytes]]:
        prefix = check_day(day).encode() + b"\0"
        start = prefix + (int(after) + 1 if after is not None else 0).to_bytes(8, "big")
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["log"])
            if cur.set_range(start):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    out.append((f"{int.from_bytes(key[len(prefix):], 'big'):020d}", bytes(value)))
        return out

    def realtime(self, user: str) -> np.ndarray:
        with self.env.begin() as txn:
            return unpack(txn.get(user.encode(), db=self.db["realtime"]))

    def put_daily(self, version: str, users: list[str], vectors: dict[str, np.ndarray],
                  lifelong: dict[str, np.ndarray] | None = None) -> None:
        prefix = check_version(version).encode() + b"\0"
        layout = vector_layout(users, vectors)
        rows = pack_vectors(vectors)

        def apply(txn) -> None:
            for user, row in zip(users, rows):
                txn.put(prefix + user.encode(), row.tobytes(), db=self.db["daily"])
            for user, records in (lifelong or {}).items():
                txn.put(prefix + user.encode(), pack(records), db=self.db["lifelong"])
            txn.put(b"version:" + version.encode(), json.dumps(layout).encode(), db=self.db["meta"])

        self._write(apply)

    def publish(self, version: str) -> None:
        def apply(txn) -> None:
            if txn.get(b"version:" + check_version(version).encode(), db=self.db["meta"]) is None:
                raise PinnerformerError(f"publish: version {version!r} was never written to {self.url}")
            txn.put(b"current", version.encode(), db=self.db["meta"])

        self._write(apply)

    def current_version(self) -> str | None:
        with self.env.begin() as txn:
            v = txn.get(b"current", db=self.db["meta"])
        return v.decode() if v is not None else None

    def versions(self) -> list[str]:
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["meta"])
            out = []
            if cur.set_range(b"version:"):
                for key in cur.iternext(values=False):
                    if not key.startswith(b"version:"):
                        break
                    out.append(key[len(b"version:"):].decode())
        return out

    def drop_version(self, version: str) -> None:
        prefix = check_version(version).encode() + b"\0"
        if version == self.current_version():
            raise PinnerformerError(f"drop_version: {version!r} is the current version of {self.url}")

        def apply(txn) -> None:
            for name in ("daily", "lifelong"):
                cur = txn.cursor(db=self.db[name])
                if cur.set_range(prefix):
                    while cur.key().startswith(prefix):
                        if not cur.delete():
                            break
            txn.delete(b"version:" + version.encode(), db=self.db["meta"])

        self._write(apply)

    def daily(self, user: str, version: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with self.env.begin() as txn:  # one read transaction: the version and its data belong together
            version = version or (txn.get(b"current", db=self.db["meta"]) or b"").decode()
            layout = txn.get(b"version:" + version.encode(), db=self.db["meta"]) if version else None
            if layout is None:
                return {}, np.zeros(0, EVENT)
            key = version.encode() + b"\0" + user.encode()
            return (unpack_vectors(txn.get(key, db=self.db["daily"]), json.loads(layout)),
                    unpack(txn.get(key, db=self.db["lifelong"])))

    def event_count(self) -> int:
        with self.env.begin() as txn:
            return int.from_bytes(txn.get(b"events", default=b"\0" * 8, db=self.db["meta"]), "little")

    def ping(self) -> None:
        try:
            with self.env.begin() as txn:
                txn.get(b"current", db=self.db["meta"])
        except lmdb.Error as e:
            raise StoreUnavailable(f"{self.path}: LMDB read failed: {e}") from None

    def close(self) -> None:
        self.env.close()
