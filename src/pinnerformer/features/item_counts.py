"""Item counters at time t: the item's events per action type and in total over each window, its smoothed rate of
each head (events of the head's actions over all its events, shrunk towards the global rate before t), its age
(since its first event) and recency (since its last)."""

from __future__ import annotations

import numpy as np

from pinnerformer.features.point_in_time import (
    EventLog, FeatureConfig, GroupedTimes, Queries, before, counts_each, log_hours, smoothed, window_names,
    window_start,
)


def _times(log: EventLog) -> tuple[GroupedTimes, GroupedTimes]:
    if "item_counts" not in log.cache:
        A = len(log.action_names)
        log.cache["item_counts"] = (GroupedTimes(log.item * A + log.action, log.ts), log.grouped("item"))
    return log.cache["item_counts"]


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    by_action, by_item = _times(log)
    A, out = len(log.action_names), {}
    windows = window_names(cfg)
    los = [window_start(q.t, days) for _, days in windows]
    per_window = counts_each(by_action, q.item, range(A), A, los, q.t)  # [window] of [action, rows]
    totals = by_item.counts(q.item, los, q.t)
    for w, (wname, _) in enumerate(windows):
        for a, aname in enumerate(log.action_names):
            out[f"item.{aname}.{wname}"] = np.log1p(per_window[w][a])
        out[f"item.events.{wname}"] = np.log1p(totals[w])
    per_action_all = list(per_window[-1])  # the last window is "all"
    total = np.sum(per_action_all, 0) if per_action_all else np.zeros(len(q))
    prior = log.global_rates(q.t)
    for h, (hname, codes) in enumerate(log.heads):
        hits = sum(per_action_all[int(a)] for a in codes) if len(codes) else 0
        out[f"item.rate.{hname}"] = smoothed(hits, total, prior[:, h], cfg.prior_weight)
    out["item.age_h"] = log_hours(q.t - by_item.first_before(q.item, q.t))
    out["item.recency_h"] = log_hours(q.t - by_item.last_before(q.item, q.t))
    return out


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    t, item = int(q.t[i]), int(q.item[i])
    mine = before(log, t) & (log.item == item)
    out = {}
    for wname, days in window_names(cfg):
        inside = mine & (log.ts >= (t // 86400 - days + 1) * 86400 if days else mine)
        for a, aname in enumerate(log.action_names):
            out[f"item.{aname}.{wname}"] = np.log1p(int((inside & (log.action == a)).sum()))
        out[f"item.events.{wname}"] = np.log1p(int(inside.sum()))
    everything = before(log, t)
    for hname, codes in log.heads:
        g = everything.sum()
        prior = (np.isin(log.action, codes) & everything).sum() / g if g else 0.5
        hits = (mine & np.isin(log.action, codes)).sum()
        out[f"item.rate.{hname}"] = float(smoothed(hits, mine.sum(), prior, cfg.prior_weight))
    ts = log.ts[mine]
    out["item.age_h"] = float(log_hours(np.array([t - ts.min() if len(ts) else np.nan]))[0])
    out["item.recency_h"] = float(log_hours(np.array([t - ts.max() if len(ts) else np.nan]))[0])
    return out
