"""The candidate against the user's realtime sequence at time t (their last `seq_n` actions before t): how many of
them were on this very item, how many on an item of the candidate's first interest, and, with item vectors, the
cosine similarity of the candidate's vector with theirs (the largest, the mean, the newest action's)."""

from __future__ import annotations

import numpy as np

from pinnerformer.features.point_in_time import EventLog, FeatureConfig, GroupedTimes, Queries, before

CHUNK = 1024  # rows per cosine block: [CHUNK, seq_n, E] floats at a time


def _times(log: EventLog) -> GroupedTimes:
    if "sequence_match" not in log.cache:
        log.cache["sequence_match"] = log.grouped("user")
    return log.cache["sequence_match"]


def _values(log: EventLog, items: np.ndarray, valid: np.ndarray, cand: np.ndarray) -> dict[str, np.ndarray]:
    """The features from the [rows, n] sequence items (valid: where an action is) and the candidates."""
    n = valid.sum(1)
    fi = log.first_interest
    out = {"seq.actions": np.log1p(n),
           "seq.same_item": np.log1p(((items == cand[:, None]) & valid).sum(1)),
           "seq.same_interest": np.log1p(((fi[items] == fi[cand][:, None]) & (fi[cand][:, None] >= 0) & valid).sum(1))}
    if log.item_vectors is not None:
        cos = np.einsum("rne,re->rn", log.item_vectors[items], log.item_vectors[cand])
        out["seq.cos_max"] = np.where(n > 0, np.where(valid, cos, -np.inf).max(1, initial=-np.inf), 0.0)
        out["seq.cos_mean"] = np.where(n > 0, np.where(valid, cos, 0.0).sum(1) / np.maximum(n, 1), 0.0)
        out["seq.cos_last"] = np.where(valid[:, 0], cos[:, 0], 0.0)
    return out


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    parts = []
    for s in range(0, len(q), CHUNK):
        # each (user, t)'s last actions found once, then given to its rows
        users, inverse = q.part(s, s + CHUNK).per_user()
        events, valid = _times(log).window(users.user, users.t, cfg.seq_n)
        parts.append(_values(log, log.item[events][inverse], valid[inverse], q.item[s:s + CHUNK]))
    if not parts:
        parts.append(_values(log, np.zeros((0, cfg.seq_n), np.int64), np.zeros((0, cfg.seq_n), bool),
                             np.zeros(0, np.int64)))
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float64) for k in parts[0]}


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    mine = np.flatnonzero(before(log, int(q.t[i])) & (log.user == q.user[i]))
    mine = mine[np.argsort(log.ts[mine], kind="stable")][::-1][:cfg.seq_n]  # newest first
    items = np.zeros((1, cfg.seq_n), np.int64)
    valid = np.zeros((1, cfg.seq_n), bool)
    items[0, :len(mine)], valid[0, :len(mine)] = log.item[mine], True
    return {k: float(v[0]) for k, v in _values(log, items, valid, q.item[i:i + 1]).items()}
