"""Evaluation tasks: which users are embedded from which actions, and which items are their labels.

future-window: for a cut-off time t, a user is eligible when they have an action before t and a positive action
in [t, t + label_days); their input is every action before t and their labels the distinct items of those
positives. The cut-off is either given (one or several days, pooled: each (user, cut-off) window counts once) or,
during training, drawn per user (seeded) among the times that make them eligible, so that most held-out users
count. leave-one-out: the input is every action but the last one (test) or the last two (validation), the label
the action after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pinnerformer.data.clock import DAY, parse_day, day_start_ts
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.timelines import Timelines
from pinnerformer.errors import PinnerformerError


@dataclass
class EvalTask:
    """Users to embed from [start, end) with labels; labels[i] are item ids (distinct)."""

    name: str
    users: np.ndarray
    starts: np.ndarray  # first input action (the caller keeps the last M)
    ends: np.ndarray  # one past the newest input action
    labels: list[np.ndarray]
    cutoff: np.ndarray | None = None  # t per row (future-window)

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> "EvalTask":
        return EvalTask(self.name, self.users[rows], self.starts[rows], self.ends[rows],
                        [self.labels[i] for i in rows], None if self.cutoff is None else self.cutoff[rows])


def _window(tl: Timelines, pos_codes: np.ndarray, u: int, t: int, horizon: int,
            until: int | None = None) -> tuple[int, np.ndarray] | None:
    """User u at cut-off t: (input end index, label items), or None when not eligible. Labels stop at `until`."""
    s, e = int(tl.offsets[u]), int(tl.offsets[u + 1])
    ts = np.asarray(tl.ts[s:e])
    a = int(np.searchsorted(ts, t, side="left"))
    b = int(np.searchsorted(ts, t + horizon if until is None else min(t + horizon, until), side="left"))
    if a == 0 or b == a:
        return None
    it = np.asarray(tl.item[s + a:s + b])[np.isin(np.asarray(tl.action[s + a:s + b]), pos_codes)]
    return (s + a, np.unique(it).astype(np.int64)) if len(it) else None


def eligible_windows(ds: Dataset, users: np.ndarray, t: int, label_days: float) -> list:
    """Per user: (input end index, label items) when eligible at cut-off t, else None."""
    pos = np.array(ds.manifest.positive_codes)
    return [_window(ds.timelines, pos, int(u), t, int(label_days * DAY)) for u in users]


def _sampled_cutoff(tl: Timelines, pos_codes: np.ndarray, u: int, horizon: int, rng: np.random.Generator,
                    until: int | None = None) -> int | None:
    """A time t after the user's first action with a positive in [t, min(t + horizon, until)), uniformly among the
    distinct times that qualify; None when there is none."""
    s, e = int(tl.offsets[u]), int(tl.offsets[u + 1])
    ts = np.asarray(tl.ts[s:e])
    times = np.unique(ts[(ts > ts[0]) & (ts < (until if until is not None else np.iinfo(np.int64).max))])
    if len(times) == 0:
        return None
    cum = np.concatenate([[0], np.cumsum(np.isin(np.asarray(tl.action[s:e]), pos_codes))])
    stop = times + horizon if until is None else np.minimum(times + horizon, until)
    ok = cum[np.searchsorted(ts, stop, side="left")] > cum[np.searchsorted(ts, times, side="left")]
    return int(times[rng.choice(np.flatnonzero(ok))]) if ok.any() else None


def future_window_task(ds: Dataset, users: np.ndarray, label_days: float, name: str, cutoffs: list[int] | None = None,
                       seed: int = 0, max_users: int | None = None, until: int | None = None) -> EvalTask:
    """Every eligible (user, cut-off) window, cut-off by cut-off; cutoffs=None: one drawn cut-off per user (seed).
    max_users: a seeded random subset of that many windows. until: nothing at or after this time is read (a model
    trained on a period only, e.g. the ranking feature's PinnerFormer, is also selected on that period only)."""
    tl = ds.timelines
    pos = np.array(ds.manifest.positive_codes)
    horizon = int(label_days * DAY)
    rows: list[tuple[int, int, int, np.ndarray]] = []  # (user, end, t, labels)
    if cutoffs is None:
        rng = np.random.default_rng(seed)
        for u in users:
            t = _sampled_cutoff(tl, pos, int(u), horizon, rng, until)
            if t is not None:
                end, labels = _window(tl, pos, int(u), t, horizon, until)
                rows.append((int(u), end, t, labels))
    else:
        for t in cutoffs:
            for u in users:
                w = _window(tl, pos, int(u), t, horizon, until)
                if w is not None:
                    rows.append((int(u), w[0], t, w[1]))
    u_arr = np.array([r[0] for r in rows], dtype=np.int64)
    task = EvalTask(name, u_arr, np.asarray(tl.offsets[u_arr], dtype=np.int64),
                    np.array([r[1] for r in rows], dtype=np.int64), [r[3] for r in rows],
                    np.array([r[2] for r in rows], dtype=np.int64))
    if max_users is not None and len(task) > max_users:
        task = task.subset(np.sort(np.random.default_rng(seed + 1).choice(len(task), max_users, replace=False)))
    return task


def default_cutoff(ds: Dataset, users: np.ndarray, label_days: float) -> tuple[int, int]:
    """The day boundary (UTC midnight) that makes the most evaluation users eligible, and that count."""
    m = ds.manifest
    days = np.arange((m.time_min // DAY + 1) * DAY, m.time_max, DAY)
    grid = days[:: max(1, len(days) // 200)]  # at most ~200 candidates: cheap, and fine enough
    counts = [sum(w is not None for w in eligible_windows(ds, users, int(t), label_days)) for t in grid]
    best = int(np.argmax(counts))
    return int(grid[best]), int(counts[best])


def parse_cutoffs(days: list[str] | None, ds: Dataset) -> list[int] | None:
    """YYYY-MM-DD days -> cut-off times (the start of each day, UTC), inside the data's time range."""
    if not days:
        return None
    out = []
    for text in days:
        t = day_start_ts(parse_day(text, "cut-off"))
        if not ds.manifest.time_min < t <= ds.manifest.time_max:
            raise PinnerformerError(f"cut-off {text} is outside the data's time range ({ds.manifest.time_range_text()})")
        out.append(t)
    return out


def leave_one_out_task(ds: Dataset, which: str, among: np.ndarray | None = None) -> EvalTask:
    """which = "validation" (target: second-to-last action) or "test" (target: last action); among: only these
    users (default: every user)."""
    tl = ds.timelines
    drop = 2 if which == "validation" else 1
    lengths = tl.lengths
    users = np.flatnonzero(lengths >= drop + 1)  # at least one action of history
    if among is not None:
        users = np.intersect1d(users, among)
    starts = tl.offsets[:-1][users]
    ends = tl.offsets[1:][users] - drop
    labels = [np.array([int(tl.item[e])], dtype=np.int64) for e in ends]
    return EvalTask(f"leave-one-out/{which}", users, starts, ends, labels)
