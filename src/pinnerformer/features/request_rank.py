"""The candidate among the other candidates of its request (known together at serving time): its rank by the item's
events before t (0 = the most popular of the request, 1 = the least), the gap in log1p events to the request's most
popular candidate, and the request's size."""

from __future__ import annotations

import numpy as np

from pinnerformer.features.point_in_time import EventLog, FeatureConfig, GroupedTimes, Queries, before


def _times(log: EventLog) -> GroupedTimes:
    if "request_rank" not in log.cache:
        log.cache["request_rank"] = log.grouped("item")
    return log.cache["request_rank"]


def _values(requests: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: the rank of its count within its request (ties share the best rank), scaled to [0, 1]."""
    pop = np.log1p(counts.astype(np.float64))
    order = np.lexsort((-pop, requests))
    r_sorted, p_sorted = requests[order], pop[order]
    start = np.searchsorted(r_sorted, r_sorted, side="left")
    size = np.searchsorted(r_sorted, r_sorted, side="right") - start
    # the rank of a value is the number of candidates of its request strictly more popular: the offset of its run of
    # equal values from the request's start
    idx = np.arange(len(order))
    new_run = np.ones(len(order), bool)
    new_run[1:] = (r_sorted[1:] != r_sorted[:-1]) | (p_sorted[1:] != p_sorted[:-1])
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0)) if len(order) else idx
    rank, top, n = np.empty(len(order)), np.empty(len(order)), np.empty(len(order))
    rank[order] = (run_start - start) / np.maximum(size - 1, 1)
    top[order] = p_sorted[start] - p_sorted
    n[order] = size
    return {"req.popularity_rank": rank, "req.gap_to_top": top, "req.size": np.log1p(n)}


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    return _values(q.request, _times(log).count(q.item, None, q.t))


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    same = np.flatnonzero(q.request == q.request[i])
    pop = {int(j): np.log1p(int((before(log, int(q.t[j])) & (log.item == q.item[j])).sum())) for j in same}
    mine = pop[i]
    more = sum(1 for j in same if pop[int(j)] > mine)
    return {"req.popularity_rank": more / max(len(same) - 1, 1), "req.gap_to_top": max(pop.values()) - mine,
            "req.size": float(np.log1p(len(same)))}
