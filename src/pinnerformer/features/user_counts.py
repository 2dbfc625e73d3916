"""User counters at time t: the user's events per action type (all time) and in total over each window, their
smoothed rate of each head, the time since their last event and the number of UTC days they were active."""

from __future__ import annotations

import numpy as np

from pinnerformer.data.clock import DAY
from pinnerformer.features.point_in_time import (
    EventLog, FeatureConfig, GroupedTimes, Queries, before, counts_each, log_hours, smoothed, window_names,
    window_start,
)


def _times(log: EventLog) -> tuple[GroupedTimes, GroupedTimes, GroupedTimes]:
    if "user_counts" not in log.cache:
        A = len(log.action_names)
        day = log.ts // DAY
        order = np.lexsort((day, log.user))  # one (user, day) per active day: the first of each run
        u, d = log.user[order], day[order]
        first = np.ones(len(u), bool)
        first[1:] = (u[1:] != u[:-1]) | (d[1:] != d[:-1])
        log.cache["user_counts"] = (GroupedTimes(log.user * A + log.action, log.ts), log.grouped("user"),
                                    GroupedTimes(u[first], d[first] * DAY))
    return log.cache["user_counts"]


def columns(log: EventLog, rows: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    by_action, by_user, days = _times(log)
    q, inverse = rows.per_user()  # the user's past alone: once per (user, t)
    A, out = len(log.action_names), {}
    per_action = list(counts_each(by_action, q.user, range(A), A, [None], q.t)[0])
    for a, aname in enumerate(log.action_names):
        out[f"user.{aname}.all"] = np.log1p(per_action[a])
    windows = window_names(cfg)
    # the windows and t's own day (active today?) in one call
    *per_window, today = by_user.counts(q.user, [window_start(q.t, d) for _, d in windows] + [window_start(q.t, 1)],
                                        q.t)
    for (wname, _), n in zip(windows, per_window):
        out[f"user.events.{wname}"] = np.log1p(n)
    total = np.sum(per_action, 0)
    prior = log.global_rates(q.t)
    for h, (hname, codes) in enumerate(log.heads):
        hits = sum(per_action[int(a)] for a in codes) if len(codes) else 0
        out[f"user.rate.{hname}"] = smoothed(hits, total, prior[:, h], cfg.prior_weight)
    out["user.recency_h"] = log_hours(q.t - by_user.last_before(q.user, q.t))
    # days before t's day with an event, and t's own day if it already has one before t
    earlier_days = days.count(q.user, None, (q.t // DAY) * DAY)
    out["user.active_days"] = np.log1p(earlier_days + (today > 0))
    return {name: v[inverse] for name, v in out.items()}


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    t, u = int(q.t[i]), int(q.user[i])
    mine = before(log, t) & (log.user == u)
    out = {}
    for a, aname in enumerate(log.action_names):
        out[f"user.{aname}.all"] = np.log1p(int((mine & (log.action == a)).sum()))
    for wname, d in window_names(cfg):
        inside = mine & (log.ts >= (t // DAY - d + 1) * DAY) if d else mine
        out[f"user.events.{wname}"] = np.log1p(int(inside.sum()))
    everything = before(log, t)
    for hname, codes in log.heads:
        g = everything.sum()
        prior = (np.isin(log.action, codes) & everything).sum() / g if g else 0.5
        out[f"user.rate.{hname}"] = float(smoothed((mine & np.isin(log.action, codes)).sum(), mine.sum(), prior,
                                                   cfg.prior_weight))
    ts = log.ts[mine]
    out["user.recency_h"] = float(log_hours(np.array([t - ts.max() if len(ts) else np.nan]))[0])
    out["user.active_days"] = np.log1p(len(set((ts // DAY).tolist())))
    return out
