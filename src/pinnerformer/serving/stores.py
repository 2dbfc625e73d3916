"""Open the online store a URL names: `redis://…` (or `rediss://`, `unix://`) -> RedisStore; `lmdb:///path` or a plain
path -> LmdbStore (embedded, no server)."""

from __future__ import annotations

from pinnerformer.serving.store import REALTIME_CAP, OnlineStore


def open_store(url: str, realtime_cap: int = REALTIME_CAP) -> OnlineStore:
    if url.startswith(("redis://", "rediss://", "unix://")):
        from pinnerformer.serving.store_redis import RedisStore

        return RedisStore(url, realtime_cap=realtime_cap)
    from pinnerformer.serving.store_lmdb import LmdbStore

    return LmdbStore(url.removeprefix("lmdb://"), realtime_cap=realtime_cap)
