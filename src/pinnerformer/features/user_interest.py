"""The user's actions on the candidate's interests (genres, categories) at time t. Of the candidate's interests, the
one the user acted on most: the user's events on it (log1p), its share of all the user's events, their smoothed
rate of each head on it, and the time since their last event on any of the candidate's interests."""

from __future__ import annotations

import numpy as np

from pinnerformer.features.point_in_time import (
    EventLog, FeatureConfig, GroupedTimes, Queries, before, counts_each, log_hours, smoothed,
)


def _times(log: EventLog) -> tuple[GroupedTimes, GroupedTimes, GroupedTimes]:
    if "user_interest" not in log.cache:
        A, K = len(log.action_names), max(log.n_interests, 1)
        ev, interest = log.interests_of(log.item)  # one row per (event, interest of its item)
        key = log.user[ev] * K + interest
        log.cache["user_interest"] = (GroupedTimes(key * A + log.action[ev], log.ts[ev]), GroupedTimes(key, log.ts[ev]),
                                      log.grouped("user"))
    return log.cache["user_interest"]


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    by_action, by_key, by_user = _times(log)
    A, K, Q = len(log.action_names), max(log.n_interests, 1), len(q)
    prior = log.global_rates(q.t)
    row, interest = log.interests_of(q.item)  # one row per (query, interest of its candidate), in query order
    lens = np.bincount(row, minlength=Q)
    key, t = q.user[row] * K + interest, q.t[row]
    n = by_key.count(key, None, t)
    # per query, the interest with the most events (the first of equals): rows sorted by (query, -n, position)
    order = np.lexsort((np.arange(len(row)), -n, row))
    first = order[np.searchsorted(row[order], np.arange(Q))[lens > 0]] if len(row) else np.zeros(0, np.int64)
    has = lens > 0
    count = np.zeros(Q)
    count[has] = n[first]
    total = by_user.count(q.user, None, q.t)
    out = {"uint.events": np.log1p(count), "uint.share": np.where(total > 0, count / np.maximum(total, 1), 0.0)}
    for h, (hname, codes) in enumerate(log.heads):
        hits = np.zeros(Q)
        if len(row):
            hits[has] = counts_each(by_action, key, codes, A, [None], t)[0].sum(0)[first]
        out[f"uint.rate.{hname}"] = smoothed(hits, count, prior[:, h], cfg.prior_weight)
    since = np.full(Q, np.nan)
    if len(row):
        gap = t - by_key.last_before(key, t)  # NaN where none
        gap = np.where(np.isnan(gap), np.inf, gap)
        best = np.full(Q, np.inf)
        np.minimum.at(best, row, gap)
        since = np.where(np.isinf(best), np.nan, best)
    out["uint.recency_h"] = log_hours(since)
    return out


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    t, u = int(q.t[i]), int(q.user[i])
    mine = before(log, t) & (log.user == u)
    everything = before(log, t)
    best, best_n, since = None, -1, np.nan
    for j in log.item_interests[int(q.item[i])].tolist():
        on_j = mine & np.array([j in log.item_interests[it].tolist() for it in log.item], bool)
        if on_j.sum() > best_n:
            best, best_n = on_j, int(on_j.sum())
        if on_j.any():
            since = np.nanmin([since, t - log.ts[on_j].max()])
    count = max(best_n, 0)
    out = {"uint.events": np.log1p(count), "uint.share": count / mine.sum() if mine.sum() else 0.0}
    for hname, codes in log.heads:
        g = everything.sum()
        prior = (np.isin(log.action, codes) & everything).sum() / g if g else 0.5
        hits = 0 if best is None else int((best & np.isin(log.action, codes)).sum())
        out[f"uint.rate.{hname}"] = float(smoothed(hits, count, prior, cfg.prior_weight))
    out["uint.recency_h"] = float(log_hours(np.array([since]))[0])
    return out
