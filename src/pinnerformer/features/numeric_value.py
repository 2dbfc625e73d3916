"""Where events carry a number (MovieLens: the rating), at time t: the item's mean value and the user's, each
shrunk towards the global mean before t, and their sum less the global mean (a baseline predictor of the value
this user gives this item). No columns when the data carries no numbers."""

from __future__ import annotations

import numpy as np

from pinnerformer.features.point_in_time import EventLog, FeatureConfig, GroupedTimes, Queries, before, smoothed


def _times(log: EventLog) -> tuple[np.ndarray, GroupedTimes, GroupedTimes, GroupedTimes]:
    if "numeric_value" not in log.cache:
        has = np.flatnonzero(~np.isnan(log.value))
        v = log.value[has]
        log.cache["numeric_value"] = (v, GroupedTimes(np.zeros(len(has), np.int64), log.ts[has]),
                                      GroupedTimes(log.item[has], log.ts[has]), GroupedTimes(log.user[has],
                                                                                             log.ts[has]))
    return log.cache["numeric_value"]


def _mean(times: GroupedTimes, key, t, v, prior, weight):
    n = times.count(key, None, t)
    return smoothed(times.sum_before(key, t, v), n, prior, weight)


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    if log.value is None:
        return {}
    v, everyone, by_item, by_user = _times(log)
    zero = np.zeros(len(q), np.int64)
    n = everyone.count(zero, None, q.t)
    glob = np.where(n > 0, everyone.sum_before(zero, q.t, v) / np.maximum(n, 1), 0.0)
    item = _mean(by_item, q.item, q.t, v, glob, cfg.prior_weight)
    user = _mean(by_user, q.user, q.t, v, glob, cfg.prior_weight)
    return {"value.item_mean": item, "value.user_mean": user, "value.predicted": item + user - glob}


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    if log.value is None:
        return {}
    ok = before(log, int(q.t[i])) & ~np.isnan(log.value)
    glob = float(log.value[ok].mean()) if ok.any() else 0.0
    it, us = ok & (log.item == q.item[i]), ok & (log.user == q.user[i])
    item = float(smoothed(log.value[it].sum(), it.sum(), glob, cfg.prior_weight))
    user = float(smoothed(log.value[us].sum(), us.sum(), glob, cfg.prior_weight))
    return {"value.item_mean": item, "value.user_mean": user, "value.predicted": item + user - glob}
