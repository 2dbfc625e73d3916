"""Online point-in-time features: the values `feature_table` gives on the union of two logs, computed from the two
without indexing the union. One log is the served day version's (`static`: every event before its end E, a UTC
midnight; indexed once per version), the other the delta (the events from E on, which the online store keeps as
they are acknowledged: each event of the requests' users and on their candidates, and the number of all events per
action before each request's time).

Why two parts suffice: a family reads the log only through the grouped times its `_times(log)` builds and keeps in
`log.cache[<family>]` (`GroupedTimes`: counts of a key's events in [lo, t), sums of their values, their last and
first time before t, their last n) and through the global counts (`EventLog.global_times`). Each of these, over a
union split at E, is answered from the parts: counts and sums add, the last time is the later of the two and the
first the earlier, the last n events are the delta's newest then the static log's. E being a midnight, what a
family derives per UTC day (active days) never falls on both sides either. So `online_table` builds each family's
times on the small delta, pairs them with the static log's (`UnionTimes`), and runs the family's own `columns` on
the pair: the families stay the one definition of the features, and `feature_table` on the union log is the
reference the tests hold this to (`tests/test_online_features.py`). Less work, the same answers: a family keyed by
the user builds its delta part on the query users' own events (`BY_USER`), and one whose delta part holds no event
reads the static log's times as they are. A family that reads the events other than through its `_times(log)`
(kept under its own name) has no online form and is refused with a message saying so.

The service's events carry no number (no rating), so numeric_value's means are the static log's: exact, since the
union's events from E on carry none either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pinnerformer.data.clock import DAY
from pinnerformer.errors import PinnerformerError
from pinnerformer.features.point_in_time import (
    FAMILIES, EventLog, FeatureConfig, FeatureTable, GroupedTimes, Queries, family, feature_table,
)

OTHERS = -1  # the user code of delta events by users no query asks about (only their items' counts need them)
ITEM_PROPERTIES = ("first_interest", "n_interests", "interest_index")  # the static log's, not computed per request
# families whose times are keyed by the user (alone or with the item): their delta part is built on the query users'
# own events only (the same answers from fewer events: most of a delta is other users' events on the candidates);
# any other family gets the whole delta, which is always right
BY_USER = frozenset({"user_counts", "user_item", "user_interest", "sequence_match", "item_neighbours"})


class Joined:
    """Two per-event arrays read as one (the second's indexes follow the first's), without copying the first: a
    union's `log.item` for the event indexes `UnionTimes.window` gives."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __array__(self, *args, **kwargs):
        raise PinnerformerError("a feature family read the union log's events whole instead of through its "
                                "`_times(log)`: it has no online form (features/online.py)")

    def __getitem__(self, idx):
        idx = np.asarray(idx, np.int64)
        if not len(self):
            return np.zeros(idx.shape, self.a.dtype)
        if not len(self.b):
            return self.a[idx]
        if not len(self.a):
            return self.b[idx]
        first = idx < len(self.a)
        return np.where(first, self.a[np.where(first, idx, 0)], self.b[np.where(first, 0, idx - len(self.a))])


@dataclass
class Pair:
    """Per-event values of both parts (the argument `UnionTimes.sum_before` takes; indexed, `b`'s indexes follow
    `a`'s, as `UnionTimes.window` gives them)."""

    a: np.ndarray
    b: np.ndarray

    def __getitem__(self, idx):
        return Joined(self.a, self.b)[idx]


class UnionTimes:
    """The `GroupedTimes` of the union of `a`'s events (all before the split) and `b`'s (all from it on), answered
    from the two; event indexes of `b` follow `a`'s."""

    def __init__(self, a: GroupedTimes, b):
        self.a, self.b = a, b

    def count(self, key, lo, t) -> np.ndarray:
        return self.a.count(key, lo, t) + self.b.count(key, lo, t)

    def counts(self, key, los, t) -> list[np.ndarray]:
        return [x + y for x, y in zip(self.a.counts(key, los, t), self.b.counts(key, los, t))]

    def sum_before(self, key, t, values: Pair) -> np.ndarray:
        return self.a.sum_before(key, t, values.a) + self.b.sum_before(key, t, values.b)

    def last_before(self, key, t) -> np.ndarray:
        return np.fmax(self.a.last_before(key, t), self.b.last_before(key, t))  # fmax: NaN (none) loses

    def first_before(self, key, t) -> np.ndarray:
        return np.fmin(self.a.first_before(key, t), self.b.first_before(key, t))

    def window(self, key, t, n: int) -> tuple[np.ndarray, np.ndarray]:
        ia, va = self.a.window(key, t, n)
        ib, vb = self.b.window(key, t, n)
        # newest first: b's events (all later than a's) then a's; each part's valid entries are a prefix of its row
        nb = vb.sum(1, keepdims=True)
        j = np.arange(n)[None, :]
        from_a = np.minimum(np.maximum(j - nb, 0), n - 1)  # position j reads a's entry j - nb when j >= nb
        in_b = j < nb
        valid = in_b | ((j >= nb) & np.take_along_axis(va, from_a, 1))
        idx = np.where(in_b, ib + len(self.a.order), np.take_along_axis(ia, from_a, 1))
        return np.where(valid, idx, 0), valid  # 0 where none, as GroupedTimes gives


class GlobalCounts:
    """The delta's `global_times`: at each query time t, the number of all its events before t (key -1) and of each
    head's actions (key h); only all-time counts (lo None, or before the split) are asked for."""

    def __init__(self, since: int, times: np.ndarray, counts: np.ndarray, heads: list[tuple[str, np.ndarray]]):
        self.since, self.times = since, np.asarray(times, np.int64)
        counts = np.asarray(counts, np.int64).reshape(len(self.times), -1)
        member = np.zeros((counts.shape[1], len(heads) + 1), np.int64)
        member[:, -1] = 1  # the last column: every action (key -1)
        for h, (_, codes) in enumerate(heads):
            member[codes[codes < counts.shape[1]], h] = 1
        self.by_key = counts @ member  # [times, heads + 1]

    def count(self, key, lo, t) -> np.ndarray:
        t = np.asarray(t, np.int64)
        i = np.minimum(np.searchsorted(self.times, t), max(len(self.times) - 1, 0))
        late = lo is not None and bool((np.asarray(lo) > self.since).any())
        if len(t) and (not len(self.times) or (self.times[i] != t).any() or late):
            raise PinnerformerError("online features: a global count asked for at a time the delta has none for "
                                    "(a bug: please report)")
        return self.by_key[i, np.asarray(key, np.int64)] if len(t) else np.zeros(0, np.int64)


@dataclass
class Delta:
    """The events from `since` (E) on that a set of queries needs, each once, and the global counts at their
    times."""

    since: int
    user: np.ndarray  # per event: the query's user code; OTHERS for an event of a user no query has (all after those)
    item: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    times: np.ndarray  # the queries' times, sorted, unique
    counts: np.ndarray  # [times, actions]: the number of all events in [since, t) per action

    @staticmethod
    def build(since: int, users: dict[int, np.ndarray], items: np.ndarray, times, counts) -> "Delta":
        """From what the store keeps (records with fields item, action, ts, from `since` on): every event of each
        query user (`users`: code -> records) and every event on the candidates (`items`, by any user). A user's
        events on a candidate are in both: the candidates' add only the others', as many of each (item, action,
        time) as the users' own do not hold."""
        empty = np.zeros(0, np.int64)
        u_ev = [(code, r) for code, r in users.items() if len(r)]
        uu = np.concatenate([np.full(len(r), c, np.int64) for c, r in u_ev]) if u_ev else empty
        ui, ua, ut = (np.concatenate([np.asarray(r[f], np.int64) for _, r in u_ev]) if u_ev else empty
                      for f in ("item", "action", "ts"))
        ii, ia, it = (np.asarray(items[f], np.int64) for f in ("item", "action", "ts"))
        keep = np.ones(len(ii), bool)
        mine = np.flatnonzero(np.isin(ii, ui))  # only events on an item the users acted on can be theirs
        keep[mine] = _not_in((ii[mine], ia[mine], it[mine]), (ui, ua, ut))
        ts = np.concatenate([ut, it[keep]])
        if len(ts) and ts.min() < since:
            raise PinnerformerError(f"online features: the store's counters hold an event at {int(ts.min())}, before "
                                    f"the served day version's end {since}")
        return Delta(since, np.concatenate([uu, np.full(int(keep.sum()), OTHERS, np.int64)]),
                     np.concatenate([ui, ii[keep]]), np.concatenate([ua, ia[keep]]), ts,
                     np.asarray(times, np.int64), np.asarray(counts, np.int64))

    def log(self, static: EventLog, users_only: bool = False) -> EventLog:
        """The delta (`users_only`: its query users' events, the first ones: their indexes are the same in both) as
        an event log with the static log's items, actions and heads."""
        n = int((self.user != OTHERS).sum()) if users_only else len(self.ts)
        value = None if static.value is None else np.full(n, np.nan)
        return _same_items(static, EventLog(self.user[:n], self.item[:n], self.action[:n], self.ts[:n], value,
                                            static.n_users, static.n_items, static.action_names, static.heads,
                                            static.item_interests, static.item_vectors, static.neighbours_until))


def _same_items(static: EventLog, log: EventLog) -> EventLog:
    """`log` with the static log's per-item lookups (the same items: not built again per request)."""
    for name in ITEM_PROPERTIES:
        log.__dict__[name] = getattr(static, name)
    # item_neighbours' similarity snapshot (events before neighbours_until <= E: the static log's alone), shared
    log.__dict__["item_neighbours"] = static.__dict__.setdefault("item_neighbours", {})
    return log


def _not_in(rows: tuple[np.ndarray, ...], remove: tuple[np.ndarray, ...]) -> np.ndarray:
    """Mask of the rows (given by columns) left once each row of `remove` takes away one equal row (a multiset
    difference)."""
    n, m = len(rows[0]), len(remove[0])
    if not n or not m:
        return np.ones(n, bool)
    cols = [np.concatenate([r, x]) for r, x in zip(remove, rows)]
    order = np.lexsort(cols[::-1])  # equal rows together, `remove`'s first (a stable sort)
    new = np.zeros(len(order), bool)
    new[0] = True
    for c in cols:
        new[1:] |= c[order][1:] != c[order][:-1]
    run = np.cumsum(new) - 1  # the run of equal rows of each position
    k = np.bincount(run, weights=order < m).astype(np.int64)  # per run: its rows of `remove`, which come first
    p = np.arange(len(order)) - np.flatnonzero(new)[run]  # position within the run
    keep = np.empty(len(order), bool)
    keep[order] = (order >= m) & (p >= 2 * k[run])  # the run's first k rows of `rows` are taken away
    return keep[m:]


def _empty(b) -> bool:
    """Does a family's delta part hold no event (its grouped times no group, its per-event arrays nothing)?"""
    if isinstance(b, GroupedTimes):
        return not len(b.groups)
    if isinstance(b, np.ndarray):
        return not len(b)
    return isinstance(b, tuple) and all(_empty(x) for x in b)


def _paired(a, b):
    if isinstance(a, GroupedTimes):
        return UnionTimes(a, b)
    if isinstance(a, np.ndarray):
        return Pair(a, b)
    if isinstance(a, tuple):
        return tuple(_paired(x, y) for x, y in zip(a, b, strict=True))
    raise PinnerformerError(f"online features: a family keeps a {type(a).__name__} in its cache; only grouped times, "
                            "per-event arrays and tuples of them can be paired")


class PairedCache(dict):
    """The union log's `cache`: a family's entry is made on first use, by pairing what the family's `_times` builds
    on each part (the static log's is built once and kept there; the delta's on its users' events for BY_USER)."""

    def __init__(self, static: EventLog, delta: EventLog, users: EventLog):
        super().__init__()
        self.static, self.delta, self.users = static, delta, users

    def __contains__(self, name) -> bool:
        return True  # a family never builds its own times from the union's arrays: __missing__ pairs the parts'

    def __missing__(self, name: str):
        if name not in FAMILIES:
            raise PinnerformerError(f"a feature family keeps its times under log.cache[{name!r}]: the online features "
                                    "pair a family's `_times(log)` by the family's name (features/online.py)")
        fam = family(name)
        if not hasattr(fam, "_times"):
            raise PinnerformerError(f"feature family {name} keeps its times without `_times(log)`: it has no online "
                                    "form (features/online.py)")
        a, b = fam._times(self.static), fam._times(self.users if name in BY_USER else self.delta)
        self[name] = a if _empty(b) else _paired(a, b)  # no event of the family's since the split: the static log's
        return self[name]


def check_split(static: EventLog, since: int) -> None:
    """The static log must be the events before `since`, a UTC midnight (checked once per static log)."""
    if static.cache.get("online.split") == since:
        return
    if since % DAY:
        raise PinnerformerError(f"online features: the split {since} is not a UTC midnight")
    if len(static.ts) and int(static.ts.max()) >= since:
        raise PinnerformerError(f"online features: the static log has events at or after the split {since}")
    if static.neighbours_until is not None and since < static.neighbours_until:
        raise PinnerformerError(f"online features: the served day version ends at {since}, before the end of the "
                                f"item similarity snapshot ({static.neighbours_until}): serve a later version")
    static.cache["online.split"] = since


def online_table(static: EventLog, delta: Delta, q: Queries, cfg: FeatureConfig) -> FeatureTable:
    """The features `feature_table` gives for `q` on the union of `static` (the events before delta.since) and the
    delta's events; every query's time must be one of the delta's times."""
    check_split(static, delta.since)
    part = delta.log(static)
    union = EventLog(Joined(static.user, part.user), Joined(static.item, part.item),
                     Joined(static.action, part.action), Joined(static.ts, part.ts), static.value, static.n_users,
                     static.n_items, static.action_names, static.heads, static.item_interests, static.item_vectors,
                     static.neighbours_until, cache=PairedCache(static, part, delta.log(static, users_only=True)))
    union.__dict__["global_times"] = UnionTimes(static.global_times, GlobalCounts(delta.since, delta.times,
                                                                                   delta.counts, static.heads))
    return feature_table(_same_items(static, union), q, cfg)
