"""The point-in-time features of every candidate row of ranking data: each row is (the request's user, the
candidate, the request's time), so a row sees the events strictly before its request started, never the request's
own. Computed from the dataset's events once per (ranking data, feature config) and kept with the RankData."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pinnerformer.data.requests import RankData
from pinnerformer.features.point_in_time import EventLog, FeatureConfig, FeatureTable, Queries, feature_table


def rank_event_log(rd: RankData, ds=None, until: int | None = None) -> EventLog:
    """The dataset's events with the ranking data's heads and frozen item vectors (`until`: only events before);
    the dataset may have grown since the ranking data was made (appends: later events, the same codes). Kept with
    the RankData per `until`."""
    cache = rd.__dict__.setdefault("_event_logs", {})
    if until not in cache:
        ds = ds or rd.dataset(descendants=True)
        names = ds.manifest.action_names()
        heads = [(h.name, [names.index(a) for a in h.actions]) for h in rd.heads]
        # the similarity snapshot ends where the feature PinnerFormer's data does: no row sees its own events in it
        cache[until] = EventLog.from_dataset(ds, heads, np.asarray(rd.item_vectors), until=until,
                                             neighbours_until=rd.manifest.pf_until)
    return cache[until]


def feature_names(rd: RankData, cfg: FeatureConfig) -> list[str]:
    """The columns `rank_features` gives, without computing any row."""
    log = rank_event_log(rd)
    empty = np.zeros(0, np.int64)
    # the same metadata without events: the families' sorted indexes are not built just to learn the names
    bare = replace(log, user=empty, item=empty, action=empty, ts=empty,
                   value=None if log.value is None else np.zeros(0), cache={})
    return feature_table(bare, Queries(empty, empty, empty, empty), cfg).names


def rank_features(rd: RankData, cfg: FeatureConfig) -> FeatureTable:
    """[candidate rows, features] for all of `rd`'s rows (rows in RankData order)."""
    cache = rd.__dict__.setdefault("_point_in_time", {})
    key = cfg.model_dump_json()
    if key not in cache:
        r = rd.cand_request
        q = Queries(rd.request_user[r], rd.cand_item, rd.request_t[r], r)
        cache[key] = feature_table(rank_event_log(rd, rd.dataset()), q, cfg)
    return cache[key]
