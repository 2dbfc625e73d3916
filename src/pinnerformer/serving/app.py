"""`pinnerformer serve`: the FastAPI application (models and the FAISS index in process).

    POST /v1/events                  events in: validated, durable in the store before the reply
    POST /v1/rank                    a user and candidates -> per-head scores and the served score, best first
    POST /v1/recommend               a user -> retrieve n unseen candidates, rank them, the top k
    GET  /v1/users/{id}/embedding    the user's vectors of the current day version
    GET  /v1/users/{id}/events       the user's realtime events, newest first
    POST /v1/admin/reload            load the work directory's models and newest snapshot again
    GET  /healthz, /readyz, /metrics liveness, readiness (store reachable, a day version published), Prometheus

Auth: every /v1/ endpoint needs `Authorization: Bearer TOKEN` (the scheme in any case; no scheme: 401). The
read-write token may call everything; the optional read-only token may rank, recommend and read users, and gets a
403 on the writes (events, reload). Missing or wrong token: 401. /healthz, /readyz and /metrics are open (probes and
scrapers hold no token). No interactive docs (/docs, /redoc: their pages load assets from a public CDN); the schema
is at /openapi.json.

A user without vectors or events gets the same answer as any user (`"vectors": {}`, `"events": []`), not a 404:
which ids exist is not told.

Every answer names the versions it used (ranker, index, day version). Ranking requests that arrive together are
scored in one forward pass (`ServiceSettings.batch_max`, `batch_wait_ms`); a request waits at most
`timeout_s` (504). Invalid JSON or fields: 422 naming the field and what is wrong, never echoing the value; unknown
fields: 422; unknown items, actions or surfaces: 400 with the name; the store unreachable: 503; a body over
`max_body_bytes` (the bytes received are counted, with or without Content-Length): 413.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.errors import PinnerformerError
from pinnerformer.serving import engine as eng
from pinnerformer.serving.metrics import ServiceMetrics
from pinnerformer.serving.api_models import BodyLimit, EventsIn, Id, RankIn, RecommendIn
from pinnerformer.serving.event_log import log_entries
from pinnerformer.serving.store import DEFAULT_CLIENT, BatchConflict, OnlineStore, StoreUnavailable, events

FUTURE_SKEW_S = 300  # an event may be stamped at most this far ahead of the server's clock
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

    def __init__(self, bundle: eng.Bundle, store: OnlineStore, token: str, settings: ServiceSettings, *,
                 read_token: str | None = None):
        if read_token is not None and read_token == token:
            raise PinnerformerError("the read-only token is the read-write token: give it another value")
        self.store, self.settings = store, settings
        self.state = (bundle, store.current_version())  # swapped together, never one without the other
        self._tokens = {"write": token} | ({"read": read_token} if read_token else {})
        self.metrics = ServiceMetrics()
        self.queue: deque[Pending] = deque()
        self.wake: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pf-compute")
        self.metrics.set_versions(bundle.version, self.state[1] or "none")

    @property
    def bundle(self) -> eng.Bundle:
        return self.state[0]

    def role(self, authorization: str | None) -> str:
        """'write' or 'read': the role of the bearer token given (the scheme in any case), else Unauthorized. Each
        configured token is compared in constant time, all of them every time: the timing tells no prefix."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        given = given.strip().encode()
        roles = [role for role, token in self._tokens.items() if secrets.compare_digest(given, token.encode())]
        if scheme.lower() != "bearer" or not given or not roles:
            raise Unauthorized()
        return roles[0]

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


class Forbidden(PinnerformerError):
    """A read-only token on a write: 403."""


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

    # no /docs, /redoc: their pages load scripts from a public CDN (a third party's code next to the token)
    app = FastAPI(title="pinnerformer", version="1", description=__doc__.split("\n")[0], lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=s.settings.max_body_bytes)  # added first: inside the metrics, counted there

    @app.middleware("http")
    async def request_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        s.metrics.request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(Unauthorized)
    async def unauthorized(_: Request, e: Unauthorized):
        return JSONResponse({"detail": "missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(BatchConflict)
    async def conflict(_: Request, e: BatchConflict):
        return JSONResponse({"detail": str(e)}, 409)

    @app.exception_handler(Forbidden)
    async def forbidden(_: Request, e: Forbidden):
        return JSONResponse({"detail": str(e)}, 403)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        """422 naming the field and what is wrong, without the value given (FastAPI's default echoes it: a megabyte
        back for a megabyte in, or a 500 for a NaN it cannot write as JSON); long names are cut."""
        return JSONResponse({"detail": [{"loc": [x if isinstance(x, int) else str(x)[:64] for x in err["loc"]],
                                         "msg": err["msg"], "type": err["type"]} for err in e.errors()]}, 422)

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

    def reader(authorization: str | None = Header(None)) -> str:
        return s.role(authorization)

    def writer(request: Request, role: str = Depends(reader)) -> None:
        if role != "write":
            raise Forbidden(f"{request.method} {request.url.path} needs the read-write token; this one is read-only")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(reader)])  # no /v1/ endpoint without a token

    def check_user(user: str, field: str = "user") -> str:
        if len(user.encode()) > MAX_ID_BYTES:
            raise eng.UnknownInput(f"{field}: an id of {len(user.encode())} bytes, more than {MAX_ID_BYTES}")
        return user

    def versions(bundle: eng.Bundle, version: str | None) -> dict:
        return {**bundle.version, "day": version or "none"}

    def check_after_day(t: int, version: str | None, field: str, why: str) -> None:
        """Refuse a time before the end of the served day version (if one is served): its vectors and lifelong
        sequences hold what came before that end."""
        if version is not None and t < (end := eng.version_end(version)):
            raise eng.UnknownInput(f"{field}: {t} is before the end of the served day version {version} ({end}): {why}")

    def request_time(t: int | None, version: str | None) -> int:
        """The request's time: given, or now (+1 s: events stamped in this very second are before it). A time before
        the end of the served day version is refused: that version's vectors hold actions after it (leakage)."""
        if t is None:
            return int(time.time()) + 1
        check_after_day(t, version, "time", "its vectors hold actions after that time; give a later time or none (now)")
        return t

    def surface_code(bundle: eng.Bundle, surface: str | None, field: str = "surface") -> int:
        if surface is None:
            return 0
        if surface not in bundle.surfaces:
            raise eng.UnknownInput(f"{field}: unknown surface {surface!r} (known: "
                                   + (", ".join(bundle.surfaces) or "none") + ")")
        return bundle.surfaces.index(surface) + 1

    @v1.post("/events", dependencies=[Depends(writer)])
    def post_events(body: EventsIn):
        if len(body.events) > s.settings.max_events:
            raise eng.UnknownInput(f"events: {len(body.events)} events, more than the limit of "
                                   f"{s.settings.max_events} per request")
        b, version = s.snapshot()
        now = int(time.time())
        cols: dict[str, list] = {}
        logged: list[tuple] = []  # the events as given, for the event log
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
            check_after_day(e.time, version, f"events[{i}].time", "ranking and recommendations read only later "
                            "events from here; earlier ones belong to the batch dataset (pinnerformer data append "
                            "--allow-late)")  # else stored and listed, but no request at or after the end reads it
            if b.integer_user_ids and not eng.is_integer_id(e.user):
                raise eng.UnknownInput(f"events[{i}].user: {e.user!r} is not an integer, and the dataset's user ids "
                                       "are (the daily job adds these events to it)")
            cols.setdefault(e.user, []).append((b.item_code[e.item], b.actions.index(e.action), e.time, sc,
                                                np.nan if e.duration is None else e.duration))
            logged.append((e.user, e.item, e.action, e.time, e.surface, e.duration))
        batch = {u: events(*map(np.array, zip(*rows))) for u, rows in cols.items()}
        client = body.client or DEFAULT_CLIENT
        t0 = time.perf_counter()
        n = s.store.append(batch, body.batch_id, client=client,
                           log=log_entries(logged, now, client, body.batch_id))
        s.metrics.stage("store_append", time.perf_counter() - t0)
        s.metrics.events(n)
        return {"appended": n, "users": len(batch), "duplicate_batch": n == 0}

    @v1.post("/rank")
    async def post_rank(body: RankIn):
        if len(body.items) > s.settings.max_candidates:
            raise eng.UnknownInput(f"items: {len(body.items)} candidates, more than the limit of "
                                   f"{s.settings.max_candidates}")
        check_user(body.user)
        repeated = [x for x, n in Counter(body.items).items() if n > 1]
        if repeated:
            raise eng.UnknownInput(f"items: duplicate candidate(s) {', '.join(map(repr, repeated[:5]))}: give each "
                                   "once")
        bundle, version = s.snapshot()
        unknown = [x for x in body.items if x not in bundle.item_code]
        if unknown:
            raise eng.UnknownInput(f"items: unknown item(s) {', '.join(map(repr, unknown[:5]))}")
        items = np.array([bundle.item_code[x] for x in body.items], np.int64)
        if (items >= bundle.ranker_items).any():
            newer = [x for x, c in zip(body.items, items) if c >= bundle.ranker_items]
            raise eng.UnknownInput(f"items: {', '.join(map(repr, newer[:5]))} arrived after the ranker was trained "
                                   f"(it knows the first {bundle.ranker_items:,} items): retrain it to rank them")
        req = eng.RankRequest(body.user, items, request_time(body.time, version), surface_code(bundle, body.surface))
        probs = await s.rank(bundle, version, req)
        return {"user": body.user, "items": eng.ranked(bundle, items, probs), "versions": versions(bundle, version)}

    @v1.post("/recommend")
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

    @v1.get("/users/{user}/embedding")
    def get_embedding(user: Id):
        """A user without vectors gets `"vectors": {}`, as any user would, not a 404: which ids exist is not told."""
        check_user(user)
        version = s.state[1]
        vectors, _ = s.store.daily(user, version) if version else ({}, None)
        return {"user": user, "day": version, "vectors": {k: v.tolist() for k, v in vectors.items()}}

    @v1.get("/users/{user}/events")
    def get_events(user: Id, limit: int = Query(20, ge=1, le=1000)):
        check_user(user)
        b = s.bundle
        rt = s.store.realtime(user)[::-1][:limit]
        return {"user": user, "events": [
            {"item": b.item_ids[int(e["item"])], "action": b.actions[int(e["action"])], "time": int(e["ts"]),
             "surface": b.surfaces[int(e["surface"])] if e["surface"] >= 0 else None,
             "duration": None if np.isnan(e["duration"]) else float(e["duration"])} for e in rt]}

    @v1.post("/admin/reload", dependencies=[Depends(writer)])
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

    app.include_router(v1)
    return app
