"""`pinnerformer serve`: the FastAPI application (SPEC §7; models and the FAISS index in process).

    POST /v1/events                  events in (bearer token): validated, durable in the store before the reply
    POST /v1/rank                    a user and candidates -> per-head scores and the served score, best first
    POST /v1/recommend               a user -> retrieve n unseen candidates, rank them, the top k
    GET  /v1/users/{id}/embedding    the user's vectors of the current day version
    GET  /v1/users/{id}/events       the user's realtime events, newest first
    POST /v1/admin/reload            load the work directory's models and newest snapshot again (bearer token)
    GET  /healthz, /readyz, /metrics liveness, readiness (store reachable, a day version published), Prometheus

Every answer names the versions it used (ranker, index, day version). Ranking requests that arrive together are
scored in one forward pass (`ServiceSettings.batch_max`, `batch_wait_ms`); a request waits at most
`timeout_s` (504). Invalid JSON or fields: 422 naming the field (FastAPI); unknown users, items, actions or
surfaces: 400 / 404 with the name; the store unreachable: 503; a body over `max_body_bytes`: 413.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from pinnerformer.config import StrictModel
from pinnerformer.errors import PinnerformerError
from pinnerformer.serving import engine as eng
from pinnerformer.serving.metrics import ServiceMetrics
from pinnerformer.serving.store import OnlineStore, StoreUnavailable, events

FUTURE_SKEW_S = 300  # an event may be stamped at most this far ahead of the server's clock
MAX_TIME = 253_402_300_799  # 9999-12-31 23:59:59 UTC: Unix seconds beyond it are refused (422), not overflowed
MAX_ID_BYTES = 256  # user and item ids (UTF-8); the embedded store's keys hold at most 511 bytes


class ServiceSettings(StrictModel):
    max_events: int = Field(1000, ge=1)  # per POST /v1/events
    max_candidates: int = Field(1000, ge=1)  # per POST /v1/rank
    max_body_bytes: int = Field(1_000_000, ge=1024)
    timeout_s: float = Field(5.0, gt=0)
    batch_max: int = Field(16, ge=1)  # ranking requests scored in one forward pass
    batch_wait_ms: float = Field(2.0, ge=0)
    retrieve_n: int = Field(200, ge=1)  # candidates retrieved per recommendation
    max_k: int = Field(100, ge=1)
    watch_seconds: float = Field(0.0, ge=0)  # > 0: look for a newer snapshot this often and hand over to it


class EventIn(BaseModel):
    user: str = Field(min_length=1, max_length=128)
    item: str = Field(min_length=1, max_length=128)
    action: str = Field(min_length=1, max_length=64)
    time: int = Field(ge=0, le=MAX_TIME, description="Unix seconds")
    surface: str | None = Field(None, max_length=64)
    duration: float | None = Field(None, ge=0, le=86400)


class EventsIn(BaseModel):
    events: list[EventIn] = Field(min_length=1)
    batch_id: str | None = Field(None, min_length=1, max_length=128,
                                 description="A retried batch with the same id is applied once")


class RankIn(BaseModel):
    user: str = Field(min_length=1, max_length=128)
    items: list[str] = Field(min_length=1)
    time: int | None = Field(None, ge=0, le=MAX_TIME, description="Unix seconds (default: now)")
    surface: str | None = Field(None, max_length=64)


class RecommendIn(BaseModel):
    user: str = Field(min_length=1, max_length=128)
    k: int = Field(10, ge=1)
    n: int | None = Field(None, ge=1, description="Candidates retrieved (default: the service's retrieve_n)")
    time: int | None = Field(None, ge=0, le=MAX_TIME)
    surface: str | None = Field(None, max_length=64)


@dataclass
class Pending:
    bundle: eng.Bundle
    version: str | None
    request: eng.RankRequest
    future: asyncio.Future
    enqueued: float = 0.0

    @property
    def key(self) -> tuple:
        return id(self.bundle), self.version


class Service:
    """The state behind the app: the current bundle (swapped whole on reload), the store, the batcher, metrics."""

    def __init__(self, bundle: eng.Bundle, store: OnlineStore, token: str, settings: ServiceSettings):
        self.store, self.settings = store, settings
        self.state = (bundle, store.current_version())  # swapped together, never one without the other
        self._token = token
        self.metrics = ServiceMetrics()
        self.queue: deque[Pending] = deque()
        self.wake: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pf-compute")
        self.metrics.set_versions(bundle.version, self.state[1] or "none")

    @property
    def bundle(self) -> eng.Bundle:
        return self.state[0]

    def check_token(self, authorization: str | None) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not secrets.compare_digest(given.encode(), self._token.encode()):
            raise Unauthorized()

    def snapshot(self) -> tuple[eng.Bundle, str | None]:
        """The bundle and day version a request uses from start to end (taken once: a hand-over in the middle
        of the request does not reach it)."""
        return self.state

    async def compute(self, fn, *args):
        """Model and index work, on the service's one compute thread: torch's and FAISS's OpenMP thread pools
        belong to the thread that calls them, and several calling threads on a few cores make the pools spin against
        each other (measured: 13x slower ranking)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args))

    def ensure_worker(self) -> None:
        """The batching task of the running event loop (started with the app; started again if the app is driven
        by another loop, as test clients may do)."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done() or self.worker.get_loop() is not loop:
            self.queue = deque(p for p in self.queue if p.future.get_loop() is loop)
            self.wake = asyncio.Event()
            self.worker = loop.create_task(self.batch_loop())

    async def rank(self, bundle: eng.Bundle, version: str | None, request: eng.RankRequest) -> np.ndarray:
        self.ensure_worker()
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(bundle, version, request, fut, time.perf_counter()))
        self.wake.set()
        return await asyncio.wait_for(fut, self.settings.timeout_s)

    async def batch_loop(self) -> None:
        """Take the oldest waiting request, wait batch_wait_ms for company with the same bundle and day version,
        score them together in a worker thread."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                if self.settings.batch_wait_ms and len(self.queue) < self.settings.batch_max:
                    await asyncio.sleep(self.settings.batch_wait_ms / 1000)
                key = self.queue[0].key
                group = [p for p in self.queue if p.key == key and not p.future.done()][:self.settings.batch_max]
                for p in group:
                    self.queue.remove(p)
                while self.queue and self.queue[0].future.done():  # timed out while waiting
                    self.queue.popleft()
                if not group:
                    continue
                t0 = time.perf_counter()
                for p in group:  # waiting for a batch to form and for the ones before it
                    self.metrics.stage("batch_queue", t0 - p.enqueued)
                try:
                    out = await self.compute(eng.score, group[0].bundle, self.store, [p.request for p in group],
                                             group[0].version)
                except Exception as e:  # noqa: BLE001 - handed to each waiting request
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                self.metrics.stage("model", time.perf_counter() - t0, batch=len(group))
                for p, probs in zip(group, out):
                    if not p.future.done():
                        p.future.set_result(probs)

    def swap(self, bundle: eng.Bundle, version: str | None) -> None:
        """Requests already holding the old pair finish with it; new ones take the new one (one assignment)."""
        self.state = (bundle, version)
        self.metrics.set_versions(bundle.version, version or "none")


class Unauthorized(PinnerformerError):
    pass


def create_app(service: Service) -> FastAPI:
    s = service

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        from pinnerformer.serving.daily import watch

        s.ensure_worker()
        watcher = asyncio.create_task(watch(s, s.settings.watch_seconds)) if s.settings.watch_seconds else None
        yield
        s.worker.cancel()
        if watcher is not None:
            watcher.cancel()

    app = FastAPI(title="pinnerformer", version="1", description=__doc__.split("\n")[0], lifespan=lifespan)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > s.settings.max_body_bytes):
            response = JSONResponse({"detail": f"request body over {s.settings.max_body_bytes:,} bytes"}, 413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        s.metrics.request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(Unauthorized)
    async def unauthorized(_: Request, e: Unauthorized):
        return JSONResponse({"detail": "missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StoreUnavailable)
    async def store_down(_: Request, e: StoreUnavailable):
        return JSONResponse({"detail": f"store unavailable: {e}"}, 503)

    @app.exception_handler(eng.UnknownInput)
    async def unknown(_: Request, e: eng.UnknownInput):
        return JSONResponse({"detail": str(e)}, e.status)

    @app.exception_handler(PinnerformerError)
    async def bad_request(_: Request, e: PinnerformerError):
        return JSONResponse({"detail": str(e)}, 400)

    @app.exception_handler(asyncio.TimeoutError)
    async def timeout(_: Request, e: asyncio.TimeoutError):
        return JSONResponse({"detail": f"not answered within {s.settings.timeout_s} s"}, 504)

    def auth(authorization: str | None = Header(None)) -> None:
        s.check_token(authorization)

    def check_user(user: str, field: str = "user") -> str:
        if len(user.encode()) > MAX_ID_BYTES:
            raise eng.UnknownInput(f"{field}: an id of {len(user.encode())} bytes, more than {MAX_ID_BYTES}")
        return user

    def versions(bundle: eng.Bundle, version: str | None) -> dict:
        return {**bundle.version, "day": version or "none"}

    def request_time(t: int | None, version: str | None) -> int:
        """The request's time: given, or now (+1 s: events stamped in this very second are before it). A time before
        the end of the served day version is refused: that version's vectors hold actions after it (leakage)."""
        if t is None:
            return int(time.time()) + 1
        if version is not None and t < eng.version_end(version):
            raise eng.UnknownInput(f"time: {t} is before the end of the served day version {version} "
                                   f"({eng.version_end(version)}): its vectors hold actions after that time; give a "
                                   "later time or none (now)")
        return t

    def surface_code(bundle: eng.Bundle, surface: str | None, field: str = "surface") -> int:
        if surface is None:
            return 0
        if surface not in bundle.surfaces:
            raise eng.UnknownInput(f"{field}: unknown surface {surface!r} (known: "
                                   + (", ".join(bundle.surfaces) or "none") + ")")
        return bundle.surfaces.index(surface) + 1

    @app.post("/v1/events", dependencies=[Depends(auth)])
    def post_events(body: EventsIn):
        if len(body.events) > s.settings.max_events:
            raise eng.UnknownInput(f"events: {len(body.events)} events, more than the limit of "
                                   f"{s.settings.max_events} per request")
        b = s.bundle
        now = int(time.time())
        cols: dict[str, list] = {}
        for i, e in enumerate(body.events):
            if e.item not in b.item_code:
                raise eng.UnknownInput(f"events[{i}].item: unknown item {e.item!r}")
            if e.action not in b.actions:
                raise eng.UnknownInput(f"events[{i}].action: unknown action {e.action!r} (known: "
                                       f"{', '.join(b.actions)})")
            if e.time > now + FUTURE_SKEW_S:
                raise eng.UnknownInput(f"events[{i}].time: {e.time} is in the future (server time {now})")
            check_user(e.user, f"events[{i}].user")
            sc = surface_code(b, e.surface, f"events[{i}].surface") - 1
            cols.setdefault(e.user, []).append((b.item_code[e.item], b.actions.index(e.action), e.time, sc,
                                                np.nan if e.duration is None else e.duration))
        batch = {u: events(*map(np.array, zip(*rows))) for u, rows in cols.items()}
        t0 = time.perf_counter()
        n = s.store.append(batch, body.batch_id)
        s.metrics.stage("store_append", time.perf_counter() - t0)
        s.metrics.events(n)
        return {"appended": n, "users": len(batch), "duplicate_batch": n == 0}

    @app.post("/v1/rank")
    async def post_rank(body: RankIn):
        if len(body.items) > s.settings.max_candidates:
            raise eng.UnknownInput(f"items: {len(body.items)} candidates, more than the limit of "
                                   f"{s.settings.max_candidates}")
        check_user(body.user)
        bundle, version = s.snapshot()
        unknown = [x for x in body.items if x not in bundle.item_code]
        if unknown:
            raise eng.UnknownInput(f"items: unknown item(s) {', '.join(map(repr, unknown[:5]))}")
        items = np.array([bundle.item_code[x] for x in body.items], np.int64)
        req = eng.RankRequest(body.user, items, request_time(body.time, version), surface_code(bundle, body.surface))
        probs = await s.rank(bundle, version, req)
        return {"user": body.user, "items": eng.ranked(bundle, items, probs), "versions": versions(bundle, version)}

    @app.post("/v1/recommend")
    async def post_recommend(body: RecommendIn):
        if body.k > s.settings.max_k:
            raise eng.UnknownInput(f"k: {body.k} is above the limit of {s.settings.max_k}")
        check_user(body.user)
        bundle, version = s.snapshot()
        t = request_time(body.time, version)
        t0 = time.perf_counter()
        items, source = await s.compute(eng.candidates, bundle, s.store, body.user, t, version,
                                                min(body.n or s.settings.retrieve_n, s.settings.max_candidates))
        s.metrics.stage("retrieval", time.perf_counter() - t0)
        if not len(items):
            return {"user": body.user, "items": [], "source": source, "candidates": 0,
                    "versions": versions(bundle, version)}
        req = eng.RankRequest(body.user, items, t, surface_code(bundle, body.surface))
        probs = await s.rank(bundle, version, req)
        return {"user": body.user, "items": eng.ranked(bundle, items, probs, body.k), "source": source,
                "candidates": int(len(items)), "versions": versions(bundle, version)}

    @app.get("/v1/users/{user}/embedding")
    def get_embedding(user: str):
        check_user(user)
        version = s.state[1]
        vectors, _ = s.store.daily(user, version) if version else ({}, None)
        if not vectors:
            raise eng.UnknownInput(f"user {user!r} has no embedding in day version {version or 'none'}", 404)
        return {"user": user, "day": version, "vectors": {k: v.tolist() for k, v in vectors.items()}}

    @app.get("/v1/users/{user}/events")
    def get_events(user: str, limit: int = 20):
        check_user(user)
        b = s.bundle
        rt = s.store.realtime(user)[::-1][:max(0, min(limit, 1000))]
        return {"user": user, "events": [
            {"item": b.item_ids[int(e["item"])], "action": b.actions[int(e["action"])], "time": int(e["ts"]),
             "surface": b.surfaces[int(e["surface"])] if e["surface"] >= 0 else None,
             "duration": None if np.isnan(e["duration"]) else float(e["duration"])} for e in rt]}

    @app.post("/v1/admin/reload", dependencies=[Depends(auth)])
    def reload():
        from pinnerformer.serving.daily import hand_over

        return hand_over(s)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        s.store.ping()
        bundle, version = s.snapshot()
        if version is None:
            return JSONResponse({"ready": False, "detail": "no day version published in the store"}, 503)
        return {"ready": True, "versions": versions(bundle, version)}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(s.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
