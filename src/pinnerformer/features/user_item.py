"""The user's earlier actions on this very item at time t: how many of each type, and the time since the last
("carted this item ten minutes ago" is what a sequence model must otherwise find by itself)."""

from __future__ import annotations

import numpy as np

from pinnerformer.features.point_in_time import (
    EventLog, FeatureConfig, GroupedTimes, Queries, before, counts_each, log_hours,
)


def _times(log: EventLog) -> tuple[GroupedTimes, GroupedTimes]:
    if "user_item" not in log.cache:
        A, pair = len(log.action_names), log.user * log.n_items + log.item
        log.cache["user_item"] = (GroupedTimes(pair * A + log.action, log.ts), GroupedTimes(pair, log.ts))
    return log.cache["user_item"]


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    by_action, by_pair = _times(log)
    A, pair = len(log.action_names), q.user * log.n_items + q.item
    per_action = counts_each(by_action, pair, range(A), A, [None], q.t)[0]
    out = {f"ui.{aname}": np.log1p(per_action[a]) for a, aname in enumerate(log.action_names)}
    out["ui.recency_h"] = log_hours(q.t - by_pair.last_before(pair, q.t))
    return out


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    t = int(q.t[i])
    mine = before(log, t) & (log.user == q.user[i]) & (log.item == q.item[i])
    out = {f"ui.{aname}": np.log1p(int((mine & (log.action == a)).sum())) for a, aname in enumerate(log.action_names)}
    ts = log.ts[mine]
    out["ui.recency_h"] = float(log_hours(np.array([t - ts.max() if len(ts) else np.nan]))[0])
    return out
