"""What the service's point-in-time features cost online (issue 31's target: the lookup adds <= 5 ms p99 to a
200-candidate request): one request's features as the service computes them — the store's counters of the events
posted since the day version's end, read in one snapshot, combined with the version's indexed log
(`serving.engine.online_features`, `features.online`) — against the version's log alone (the service before the
counters), on both stores.

The version's log is synthetic, at the ML-1M scale (6,040 users, 3,706 items, 1M events over 60 days, ratings,
18 genres, 64-d item vectors, an item-similarity snapshot at its end: every family, 69 features). `--events` events are then posted after its end through
the store's own append — the path of `POST /v1/events`: realtime list, event log and counters in one transaction
— in batches of `--batch`, by `--posters` users, on items drawn by popularity (so a request's candidates have
events since the version too). A request: one of those users, 200 candidates drawn the same way, a time after the
events; each repetition a new one. The online values are checked against the offline features on the union log.

    python bench/online_features.py                      # both stores (Redis: a redis-server started here)
    python bench/online_features.py --stores lmdb --reps 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pinnerformer.data.clock import DAY
from pinnerformer.features.point_in_time import EventLog, FeatureConfig, Queries, feature_table
from pinnerformer.serving import engine as eng
from pinnerformer.serving.event_log import log_entries
from pinnerformer.serving.store import events

ACTIONS = ["view", "click", "save", "hide"]
HEADS = [("save", np.array([2])), ("click", np.array([1, 2])), ("hide", np.array([3]))]


def popularity(n: int, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / (np.arange(n) + 10.0) ** 0.9
    return rng.permutation(p / p.sum())


def static_log(args, rng: np.random.Generator) -> tuple[EventLog, int, np.ndarray]:
    """The day version's log (events before E) and E."""
    U, I, N = args.users, args.items, args.static_events
    pop = popularity(I, rng)
    start = 1_600_000_000 - 1_600_000_000 % DAY
    E = start + 60 * DAY
    user, item = rng.integers(U, size=N), rng.choice(I, N, p=pop)
    action = rng.choice(len(ACTIONS), N, p=[0.6, 0.25, 0.1, 0.05])
    ts = start + rng.integers(60 * DAY, size=N)
    order = np.lexsort((ts, user))
    value = rng.integers(1, 6, size=N).astype(np.float64)
    interests = [np.sort(rng.choice(18, rng.integers(1, 4), replace=False)).astype(np.int64) for _ in range(I)]
    vec = rng.normal(size=(I, 64)).astype(np.float32)
    log = EventLog(user[order], item[order], action[order], ts[order], value[order], U, I, ACTIONS, HEADS, interests,
                   vec / np.linalg.norm(vec, axis=1, keepdims=True), neighbours_until=E)
    return log, E, pop


def post(store, args, E: int, pop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """`--events` events after E through the store's append; returns them [(user, item, action, ts)] and the time
    of each batch's append (s)."""
    posters = rng.choice(args.users, args.posters, replace=False)
    n = args.events
    rows = np.stack([rng.choice(posters, n), rng.choice(args.items, n, p=pop),
                     rng.choice(len(ACTIONS), n, p=[0.6, 0.25, 0.1, 0.05]), E + rng.integers(20 * 3600, size=n)], 1)
    took = []
    for b in range(0, n, args.batch):
        part = rows[b:b + args.batch]
        batch = {f"u{u}": events(part[part[:, 0] == u, 1], part[part[:, 0] == u, 2], part[part[:, 0] == u, 3])
                 for u in np.unique(part[:, 0])}
        logged = [(f"u{u}", str(i), ACTIONS[a], int(t), None, None) for u, i, a, t in part]
        t0 = time.perf_counter()
        store.append(batch, f"bench-{b}", client="bench", log=log_entries(logged, int(time.time()), "bench",
                                                                          f"bench-{b}"))
        took.append(time.perf_counter() - t0)
    return rows, took


def union(static: EventLog, rows: np.ndarray) -> EventLog:
    """The static log with the posted events (each distinct one once, as the dataset keeps them)."""
    rows = rows[np.sort(np.unique(rows, axis=0, return_index=True)[1])]  # the first of each, in arrival order
    cat = [np.concatenate([getattr(static, f), rows[:, k]]) for k, f in enumerate(("user", "item", "action", "ts"))]
    value = np.concatenate([static.value, np.full(len(rows), np.nan)])
    return EventLog(*cat, value, static.n_users, static.n_items, ACTIONS, HEADS, static.item_interests,
                    static.item_vectors, static.neighbours_until)


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def measure(name: str, store, args, static: EventLog, E: int, pop: np.ndarray, cfg: FeatureConfig) -> dict:
    rng = np.random.default_rng(1)
    rows, appends = post(store, args, E, pop, rng)
    whole = union(static, rows)
    t = E + 20 * 3600 + 60
    posters = np.unique(rows[:, 0])
    timing: dict[str, list[float]] = {"static": [], "read": [], "online": []}
    exact = True
    for rep in range(args.warmup + args.reps):
        u = int(rng.choice(posters))
        items = rng.choice(args.items, args.candidates, replace=False, p=pop)
        q = Queries(np.full(len(items), u), items, np.full(len(items), t), np.zeros(len(items)))
        users = {f"u{u}": u}
        t0 = time.perf_counter()
        feature_table(static, q, cfg)
        t1 = time.perf_counter()
        store.counters(E, list(users), np.unique(items).tolist(), [t], len(ACTIONS))
        t2 = time.perf_counter()
        got = eng.online_features(static, store, E, q, users, cfg)
        t3 = time.perf_counter()
        if rep >= args.warmup:
            for k, dt_ in zip(timing, (t1 - t0, t2 - t1, t3 - t2)):
                timing[k].append(dt_)
        if rep < 5:  # the values are the offline features' on the union log
            exact &= bool(np.array_equal(got.values, feature_table(whole, q, cfg).values))
    added = np.asarray(timing["online"]) - np.asarray(timing["static"])
    return {"store": name, "candidates": args.candidates, "features": len(got.names), "events_posted": len(rows),
            "posters": len(posters), "exact": exact, "static": pct(timing["static"]), "read": pct(timing["read"]),
            "online": pct(timing["online"]), "added": pct(list(added)),
            "append_batch": {"events": args.batch, **pct(appends)}, "reps": args.reps,
            "machine": platform.processor() or platform.machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stores", default="lmdb,redis")
    p.add_argument("--users", type=int, default=6040)
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--static-events", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=5000, help="events posted after the day version's end")
    p.add_argument("--posters", type=int, default=300, help="users who post them")
    p.add_argument("--batch", type=int, default=50, help="events per append (one POST /v1/events)")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    static, E, pop = static_log(args, np.random.default_rng(0))
    cfg = FeatureConfig()
    feature_table(static, Queries([0], [0], [E], [0]), cfg)  # the version's indexes, built once (as at load)
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="online-features-"))
    try:
        for name in args.stores.split(","):
            if name == "lmdb":
                from pinnerformer.serving.store_lmdb import LmdbStore

                store, server = LmdbStore(tmp / "lmdb"), None
            else:
                from pinnerformer.serving.redis_server import RedisServer
                from pinnerformer.serving.store_redis import RedisStore

                server = RedisServer(tmp / "redis").start()
                store = RedisStore(server.url)
            try:
                out.append(measure(name, store, args, static, E, pop, cfg))
            finally:
                store.close()
                if server is not None:
                    server.stop()
            print(json.dumps(out[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| store | static log alone p50 / p99 | store read p50 / p99 | online (read + combine) p50 / p99 | "
          "added p50 / p99 | append of 50 events p50 |")
    print("|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['store']} | {r['static']['p50_ms']:.2f} / {r['static']['p99_ms']:.2f} ms | "
              f"{r['read']['p50_ms']:.2f} / {r['read']['p99_ms']:.2f} ms | {r['online']['p50_ms']:.2f} / "
              f"{r['online']['p99_ms']:.2f} ms | {r['added']['p50_ms']:.2f} / {r['added']['p99_ms']:.2f} ms | "
              f"{r['append_batch']['p50_ms']:.2f} ms |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
