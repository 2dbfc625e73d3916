"""Point-in-time features of (user, candidate item, time t) rows: the ordinary features a production ranker has
beside its sequence models (counters, rates, recency), computed from the events strictly before t only: the same
day's earlier actions included (that is what "realtime" means), the request's own actions and anything later never.

Families, one module each (`FAMILIES`), every one with a vectorised form and a plain per-row reference that the
tests compare it with:

    item_counts      the item's events per action type over windows, smoothed per-head rates, age, recency
    user_counts      the user's events per action type and in total over windows, per-head rates, recency, active days
    user_item        the user's earlier actions on this very item, by type, and the time since the last
    user_interest    the user's actions on the candidate's interests (categories, genres): counts, share, rates,
                     recency
    sequence_match   the candidate against the user's last `seq_n` actions: same item, same first interest, cosine
                     similarity of item vectors (max, mean, newest)
    numeric_value    where events carry a number (ratings): the item's and the user's smoothed means and their sum as
                     a prediction
    item_neighbours  what the user did to the items most like the candidate (item-to-item collaborative filtering,
                     on a frozen similarity snapshot)
    request_rank     the candidate among the request's candidates: its popularity rank and gap to the most popular

Windows are UTC-day aligned: "7d" is the events of t's day before t and of the 6 days before it (what an online
store keeps in day buckets). Values are ready for a network (counts as log1p, times as log1p hours, "never" as 10
years, rates smoothed towards the global rate before t, so nothing is NaN) and, being monotone transforms, serve
gradient-boosted trees unchanged.

How: every family reads groups of event times (by item and action, by user, ...) sorted once, and answers each row
with two binary searches (`GroupedTimes`): exact, O((events + rows) log events), and equivalent to a streaming pass
over time-ordered events that reads each row's counters at its time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.data.clock import DAY
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError

FAMILIES = ("item_counts", "user_counts", "user_item", "user_interest", "sequence_match", "numeric_value",
            "request_rank", "item_neighbours")
NEVER_H = 24 * 3650.0  # "never happened" reads as ten years ago
HOUR = 3600


class FeatureConfig(StrictModel):
    families: list[str] = list(FAMILIES)
    windows_days: list[int] = [1, 7, 30]  # besides "all"
    prior_weight: float = Field(10.0, gt=0)  # smoothed rate = (hits + w * global rate) / (events + w)
    seq_n: int = Field(50, ge=1)  # sequence_match: the user's last actions compared with the candidate
    neighbours_n: int = Field(200, ge=1)  # item_neighbours: the user's last actions searched for the candidate's
    neighbours_k: int = Field(30, ge=1)  # ... the most similar of them that vote
    neighbours_kept: int = Field(100, ge=1)  # similar items kept per item
    neighbours_shrink: float = Field(20.0, ge=0)  # similarity * co / (co + shrink): few co-raters, less trust


def log_hours(seconds: np.ndarray) -> np.ndarray:
    """Elapsed seconds -> log1p(hours); NaN (never) -> log1p(NEVER_H)."""
    h = np.where(np.isnan(seconds), NEVER_H, np.asarray(seconds, np.float64) / HOUR)
    return np.log1p(np.maximum(h, 0.0))


def window_start(t: np.ndarray, days: int | None) -> np.ndarray | None:
    """The first second of a `days`-day window ending at t (t's UTC day and the days - 1 before); days None: the
    whole past, which `GroupedTimes` reads as None (each group's first event: no search)."""
    if days is None:
        return None
    return (np.asarray(t, np.int64) // DAY - (days - 1)) * DAY


def window_names(cfg: FeatureConfig) -> list[tuple[str, int | None]]:
    return [(f"{d}d", d) for d in cfg.windows_days] + [("all", None)]


class GroupedTimes:
    """Event times grouped by an integer key and sorted: for any (key, t) rows, the number of the key's events in
    [lo, t) and the last / first time before t, each by binary search over one sorted composite array."""

    def __init__(self, key: np.ndarray, ts: np.ndarray):
        key, ts = np.asarray(key, np.int64), np.asarray(ts, np.int64)
        if not len(key):  # no event (an online delta without any of the family's): nothing to sort
            self.order = self.ts = self.starts = self.groups = self.composite = np.zeros(0, np.int64)
            self.t0, self.span = 0, 2
            return
        self.order = order = np.lexsort((ts, key))  # sorted position -> index of the event given
        k, self.ts = key[order], ts[order]
        new = np.empty(len(k), bool)  # where a group starts (k is sorted: no second sort, as np.unique would do)
        new[:1] = True
        np.not_equal(k[1:], k[:-1], out=new[1:])
        self.starts = np.flatnonzero(new)
        self.groups = k[self.starts]
        self.t0 = int(ts.min()) if len(ts) else 0
        self.span = (int(ts.max()) - self.t0 + 2) if len(ts) else 2
        gid = np.cumsum(new) - 1
        self.composite = gid * self.span + (self.ts - self.t0)

    def _group(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Each key's group, whether it has one, and, when few do, which rows (the rest need no search)."""
        # the same key array is often asked about again (count, then last_before, ...): its groups are kept for it
        memo = self.__dict__.get("_memo")
        if memo is not None and memo[0] is key:
            return memo[1:]
        k = np.asarray(key, np.int64)
        if len(self.groups):
            g = np.minimum(np.searchsorted(self.groups, k), len(self.groups) - 1)
            found = self.groups[g] == k
        else:
            g, found = np.zeros(k.shape, np.int64), np.zeros(k.shape, bool)
        hits = np.flatnonzero(found)
        # an online delta holds events of few of the keys asked about: its counts search for those rows alone
        rows = hits if 4 * len(hits) < len(k) else None
        self._memo = (key, g, found, rows)  # one tuple: a reader on another thread sees all of it or none
        return self._memo[1:]

    def _start(self, g: np.ndarray, lo: np.ndarray | None) -> np.ndarray:
        """Index of the group's first event at or after lo (None: the group's first)."""
        if lo is None:
            return self.starts[g] if len(self.groups) else np.zeros(len(g), np.int64)
        return self._position(g, np.maximum(lo, self.t0 - 1))

    def _position(self, g: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Index of the group's first event at or after t."""
        # minimum/maximum, not np.clip: the same values without clip's per-call dtype checks (the online features
        # call this a few hundred times per request)
        rel = np.minimum(np.maximum(np.asarray(t, np.int64) - self.t0, 0), self.span - 1)
        return np.searchsorted(self.composite, g * self.span + rel, side="left")

    def window(self, key: np.ndarray, t: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """[rows, n] indexes (into the events given) of each key's last n events before t, newest first, and where
        they exist."""
        g, found, _ = self._group(key)
        pos = self._position(g, t)[:, None] - 1 - np.arange(n)[None, :]
        valid = found[:, None] & (pos >= self.starts[g][:, None]) if len(self.groups) else np.zeros(pos.shape, bool)
        return self.order[np.where(valid, pos, 0)] if len(self.order) else np.zeros(pos.shape, np.int64), valid

    def count(self, key: np.ndarray, lo: np.ndarray | None, t: np.ndarray) -> np.ndarray:
        """The number of the key's events in [lo, t) (lo None: all before t)."""
        return self.counts(key, [lo], t)[0]

    def counts(self, key: np.ndarray, los: list[np.ndarray | None], t: np.ndarray) -> list[np.ndarray]:
        """`count(key, lo, t)` for each lo of `los` (windows ending at t), the groups and t's positions found once."""
        g, found, rows = self._group(key)
        if rows is None:
            end = self._position(g, t)
            return [np.where(found, end - self._start(g, lo), 0) for lo in los]
        g, t = g[rows], np.asarray(t, np.int64)[rows]  # the rows with events here; the others count 0
        end = self._position(g, t)
        out = []
        for lo in los:
            n = np.zeros(len(found), np.int64)
            n[rows] = end - self._start(g, None if lo is None else np.asarray(lo)[rows])
            out.append(n)
        return out

    def sum_before(self, key: np.ndarray, t: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The sum of `values` (one per event given) over the key's events before t."""
        cum = self.cache_cumsum(values)
        g, found, _ = self._group(key)
        s = cum[self._position(g, t)] - cum[self.starts[g]] if len(self.groups) else np.zeros(len(g))
        return np.where(found, s, 0.0)

    def cache_cumsum(self, values: np.ndarray) -> np.ndarray:
        if getattr(self, "_cum_of", None) is not values:
            self._cum_of, self._cum = values, np.concatenate([[0.0], np.cumsum(np.asarray(values, np.float64)[
                self.order])])
        return self._cum

    def last_before(self, key: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The time of the key's last event before t (NaN: none)."""
        g, found, _ = self._group(key)
        p = self._position(g, t) - 1
        ok = found & (p >= self.starts[g]) if len(self.groups) else found
        return np.where(ok, self.ts[np.maximum(p, 0)] if len(self.ts) else 0, np.nan)

    def first_before(self, key: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The time of the key's first event, if it is before t (NaN: none)."""
        g, found, _ = self._group(key)
        first = self.ts[self.starts[g]] if len(self.ts) else np.zeros(len(g))
        return np.where(found & (first < np.asarray(t)), first, np.nan)


def counts_each(times, base: np.ndarray, codes, width: int, los: list[np.ndarray | None], t: np.ndarray
                ) -> list[np.ndarray]:
    """`times.counts` for the keys base·width + c of every code c in one call (one search over all of them, not one
    per code): per lo, [len(codes), rows]. `times`: a GroupedTimes, or the online union of two."""
    codes = np.asarray(codes, np.int64)
    base, k = np.asarray(base, np.int64), len(codes)
    keys = (base[None, :] * width + codes[:, None]).ravel()  # code-major
    got = times.counts(keys, [None if lo is None else np.tile(lo, k) for lo in los], np.tile(t, k))
    return [c.reshape(k, len(base)) for c in got]


@dataclass
class EventLog:
    """The events features are computed from, with what the families need about items and heads."""

    user: np.ndarray  # int64 per event
    item: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    value: np.ndarray | None  # float64 per event (NaN: none), when the data carries numbers (ratings)
    n_users: int
    n_items: int
    action_names: list[str]
    heads: list[tuple[str, np.ndarray]]  # (name, action codes) per ranking head
    item_interests: list[np.ndarray]  # interest codes of each item
    item_vectors: np.ndarray | None = None  # [n_items, E], L2-normalised
    neighbours_until: int | None = None  # item_neighbours' similarity snapshot: the events before this time
    cache: dict = field(default_factory=dict)

    @staticmethod
    def from_dataset(ds: Dataset, heads: list[tuple[str, list[int]]], item_vectors: np.ndarray | None = None,
                     until: int | None = None, neighbours_until: int | None = None) -> "EventLog":
        """The dataset's events (those before `until`, when given), its items' interests, and the heads;
        `neighbours_until`: the end of item_neighbours' similarity snapshot (None: no such family's columns)."""
        tl = ds.timelines
        user, item = tl.user_of_event().astype(np.int64), np.asarray(tl.item, np.int64)
        action, ts = np.asarray(tl.action, np.int64), np.asarray(tl.ts, np.int64)
        value = numeric_values(ds)
        keep = slice(None) if until is None else np.asarray(ts < until)
        interests = ds.items["interests"] if "interests" in ds.items.columns else pl.Series([[]] * ds.manifest.n_items)
        names = sorted({x for xs in interests.to_list() for x in (xs or [])})
        code = {x: i for i, x in enumerate(names)}
        vecs = None
        if item_vectors is not None:
            v = np.asarray(item_vectors, np.float32)
            vecs = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            # items newer than the vectors (the dataset grew since they were made): none, a cosine of 0
            vecs = np.concatenate([vecs, np.zeros((max(ds.manifest.n_items - len(vecs), 0), vecs.shape[1]),
                                                  np.float32)])
        return EventLog(user[keep], item[keep], action[keep], ts[keep], None if value is None else value[keep],
                        ds.manifest.n_users, ds.manifest.n_items, ds.manifest.action_names(),
                        [(h, np.asarray(c, np.int64)) for h, c in heads],
                        [np.array([code[x] for x in (xs or [])], np.int64) for xs in interests.to_list()], vecs,
                        neighbours_until)

    def grouped(self, name: str) -> GroupedTimes:
        """The events grouped by "user" or "item": one index, shared by every family that groups the events so (kept
        beside `cache`, which the online union log fills by family name)."""
        shared = self.__dict__.setdefault("_grouped", {})
        if name not in shared:
            shared[name] = GroupedTimes(getattr(self, name), self.ts)
        return shared[name]

    @cached_property
    def n_interests(self) -> int:
        return 1 + max((int(x.max()) for x in self.item_interests if len(x)), default=-1)

    @cached_property
    def interest_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [items + 1], codes): item i's interests are codes[offsets[i]:offsets[i + 1]], for lookups by
        array instead of a Python loop over events."""
        lens = np.array([len(x) for x in self.item_interests], np.int64)
        flat = np.concatenate(self.item_interests).astype(np.int64) if len(lens) else np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(lens)]), flat

    def interests_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For items (one per row): (the row of each (row, interest) pair, its interest), rows in order."""
        offsets, flat = self.interest_index
        items = np.asarray(items, np.int64)
        lens = offsets[items + 1] - offsets[items]
        row = np.repeat(np.arange(len(items)), lens)
        within = np.arange(len(row)) - np.repeat(np.cumsum(lens) - lens, lens)
        return row, flat[offsets[items][row] + within] if len(row) else np.zeros(0, np.int64)

    @cached_property
    def first_interest(self) -> np.ndarray:
        return np.array([int(x[0]) if len(x) else -1 for x in self.item_interests], np.int64)

    @cached_property
    def global_times(self) -> GroupedTimes:
        """All events as one group per head (key h) and one for everything (key -1): the global rates' counts."""
        keys = [np.full(len(self.ts), -1, np.int64)]
        tss = [self.ts]
        for h, (_, codes) in enumerate(self.heads):
            hit = np.isin(self.action, codes)
            keys.append(np.full(int(hit.sum()), h, np.int64))
            tss.append(self.ts[hit])
        return GroupedTimes(np.concatenate(keys), np.concatenate(tss))

    def global_rates(self, t: np.ndarray) -> np.ndarray:
        """[rows, heads]: each head's share of all events before t (0.5 before any event)."""
        memo = self.__dict__.get("_rates_memo")  # several families ask for the same rows' rates in turn
        if memo is not None and memo[0] is t:
            return memo[1]
        out = self._global_rates(t)
        self._rates_memo = (t, out)  # one tuple: a reader on another thread sees all of it or none
        return out

    def _global_rates(self, t: np.ndarray) -> np.ndarray:
        g = self.global_times
        total = g.count(np.full(len(t), -1), None, t).astype(np.float64)
        out = np.empty((len(t), len(self.heads)))
        for h in range(len(self.heads)):
            out[:, h] = np.where(total > 0, g.count(np.full(len(t), h), None, t) / np.maximum(
                total, 1), 0.5)
        return out

    def head_hits(self) -> np.ndarray:
        """[events, heads] bool: does the event's action belong to the head."""
        return np.stack([np.isin(self.action, codes) for _, codes in self.heads], 1) if self.heads else np.zeros(
            (len(self.action), 0), bool)


def numeric_values(ds: Dataset) -> np.ndarray | None:
    """The number each event carries (MovieLens: its rating), in timeline order; None when fewer than half of the
    events carry one."""
    ev = ds.events(columns=["item", "detail"])
    if not np.array_equal(ev["item"].to_numpy(), np.asarray(ds.timelines.item)):
        raise PinnerformerError(f"{ds.path}: events.parquet and the timelines are not in the same order (damaged "
                                "dataset: prepare it again)")
    detail = ev["detail"]
    if detail.dtype == pl.Null:
        return None
    value = detail.cast(pl.String).cast(pl.Float64, strict=False)
    if value.is_not_null().mean() < 0.5:
        return None
    return value.fill_null(np.nan).to_numpy().astype(np.float64)


@dataclass
class Queries:
    """Rows to compute features for: (user, item, time), and the request each belongs to (request_rank)."""

    user: np.ndarray
    item: np.ndarray
    t: np.ndarray
    request: np.ndarray

    def __post_init__(self):
        self.user, self.item = np.asarray(self.user, np.int64), np.asarray(self.item, np.int64)
        self.t, self.request = np.asarray(self.t, np.int64), np.asarray(self.request, np.int64)

    def __len__(self) -> int:
        return len(self.user)

    def per_user(self) -> tuple["Queries", np.ndarray]:
        """One row per distinct (user, t), and each row's index among them: what a family that reads only the user's
        past computes once (a served request's candidates share their user and time)."""
        order = np.lexsort((self.t, self.user))
        u, t = self.user[order], self.t[order]
        new = np.ones(len(u), bool)
        new[1:] = (u[1:] != u[:-1]) | (t[1:] != t[:-1])
        inverse = np.empty(len(u), np.int64)
        inverse[order] = np.cumsum(new) - 1
        first = order[new]
        return Queries(u[new], self.item[first], t[new], self.request[first]), inverse

    def part(self, start: int, stop: int) -> "Queries":
        return Queries(self.user[start:stop], self.item[start:stop], self.t[start:stop], self.request[start:stop])

    def row(self, i: int) -> "Queries":
        return self.part(i, i + 1)


def family(name: str):
    if name not in FAMILIES:
        raise PinnerformerError(f"features.families: unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(f"pinnerformer.features.{name}")


@dataclass
class FeatureTable:
    names: list[str]
    values: np.ndarray  # [rows, features] float32


def feature_table(log: EventLog, q: Queries, cfg: FeatureConfig) -> FeatureTable:
    """Every configured family's columns for the rows `q` (a family that does not apply to the data, such as
    numeric_value without numbers, gives none)."""
    cols: dict[str, np.ndarray] = {}
    for name in cfg.families:
        cols.update(family(name).columns(log, q, cfg))
    values = np.stack([np.asarray(v, np.float32) for v in cols.values()], 1) if cols else np.zeros((len(q), 0),
                                                                                                  np.float32)
    if not np.isfinite(values).all():
        bad = [n for n, v in cols.items() if not np.isfinite(v).all()]
        raise PinnerformerError(f"point-in-time features {', '.join(bad)} are not finite (a bug: please report)")
    return FeatureTable(list(cols), values)


def reference_table(log: EventLog, q: Queries, cfg: FeatureConfig) -> FeatureTable:
    """The same table row by row from each family's plain reference (tests only: slow)."""
    rows = []
    names: list[str] = []
    for i in range(len(q)):
        r: dict[str, float] = {}
        for name in cfg.families:
            r.update(family(name).reference(log, q, i, cfg))
        names = list(r)
        rows.append([r[n] for n in names])
    return FeatureTable(names, np.asarray(rows, np.float32).reshape(len(q), len(names)))


def before(log: EventLog, t: int) -> np.ndarray:
    """Reference helper: the mask of the events strictly before t."""
    return log.ts < t


def smoothed(hits, n, prior, weight) -> np.ndarray:
    return (np.asarray(hits, np.float64) + weight * prior) / (np.asarray(n, np.float64) + weight)
