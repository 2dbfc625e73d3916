"""Who is trained on, who is evaluated, on which labels.

future-window (real clocks): users are split deterministically by a hash of (seed, user id) into train /
validation / test. Training uses train users only. An evaluation user u gets a cut-off time t_u; the input
is every action before t_u and the labels are the distinct items of positive actions in [t_u, t_u + 14 d).
During training t_u is drawn per user (seeded) among times that leave at least one action before and one
positive after, so that most held-out users count; the evaluation issue adds global cut-offs.

leave-one-out (order-only clocks, or by choice): every user trains on all but the last two actions; the
second-to-last is the validation target and the last the test target. Model selection uses validation only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.timelines import TimelineView


def user_split(user_ids: list, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = validation, 2 = test, by a stable hash of (seed, user id): same on every machine."""
    out = np.zeros(len(user_ids), dtype=np.int8)
    for i, uid in enumerate(user_ids):
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big") / 2.0 ** 64
        out[i] = 1 if h < val_fraction else (2 if h < val_fraction + test_fraction else 0)
    return out


@dataclass
class EvalTask:
    """Users to embed from [start, end) with labels; labels[i] are item ids (distinct)."""

    name: str
    users: np.ndarray
    starts: np.ndarray  # first input action (the caller keeps the last M)
    ends: np.ndarray  # one past the newest input action
    labels: list[np.ndarray]
    cutoff: np.ndarray | None = None  # t_u per user (future-window)

    def __len__(self) -> int:
        return len(self.users)


def future_window_task(ds: Dataset, users: np.ndarray, label_days: float, seed: int, name: str,
                       max_users: int | None = None) -> EvalTask:
    tl = ds.timelines
    pos_codes = np.flatnonzero(ds.positive_mask)
    rng = np.random.default_rng(seed)
    horizon = int(label_days * 86400)
    out_u, out_s, out_e, out_t, labels = [], [], [], [], []
    for u in users:
        s, e = int(tl.offsets[u]), int(tl.offsets[u + 1])
        ts = np.asarray(tl.ts[s:e])
        is_pos = np.isin(np.asarray(tl.action[s:e]), pos_codes)
        # candidate cut-offs: the distinct times t after the first action with a positive in [t, t + horizon)
        times = np.unique(ts[ts > ts[0]])
        if len(times) == 0:
            continue
        first = np.searchsorted(ts, times, side="left")
        stop = np.searchsorted(ts, times + horizon, side="left")
        cum = np.concatenate([[0], np.cumsum(is_pos)])
        ok = cum[stop] > cum[first]
        if not ok.any():
            continue
        j = rng.choice(np.flatnonzero(ok))
        a, b = first[j], stop[j]
        out_u.append(u)
        out_s.append(s)
        out_e.append(s + a)
        out_t.append(times[j])
        labels.append(np.unique(np.asarray(tl.item[s + a:s + b])[is_pos[a:b]]).astype(np.int64))
    task = EvalTask(name, np.array(out_u, dtype=np.int64), np.array(out_s, dtype=np.int64),
                    np.array(out_e, dtype=np.int64), labels, np.array(out_t, dtype=np.int64))
    if max_users is not None and len(task) > max_users:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(task), max_users, replace=False))
        task = EvalTask(name, task.users[keep], task.starts[keep], task.ends[keep], [task.labels[i] for i in keep],
                        task.cutoff[keep])
    return task


def leave_one_out_task(ds: Dataset, which: str) -> EvalTask:
    """which = "validation" (target: second-to-last action) or "test" (target: last action)."""
    tl = ds.timelines
    drop = 2 if which == "validation" else 1
    lengths = tl.lengths
    users = np.flatnonzero(lengths >= drop + 1)  # at least one action of history
    starts = tl.offsets[:-1][users]
    ends = tl.offsets[1:][users] - drop
    labels = [np.array([int(tl.item[e])], dtype=np.int64) for e in ends]
    return EvalTask(f"leave-one-out/{which}", users, starts, ends, labels)


def training_view(ds: Dataset, protocol: str, split: np.ndarray | None) -> TimelineView:
    """The events training may see: train users' timelines (future-window) or all but the last two (LOO)."""
    tl = ds.timelines
    if protocol == "leave-one-out":
        return tl.drop_last(2)
    full = tl.full()
    end = np.where(split == 0, full.end, full.start)  # held-out users contribute nothing
    return TimelineView(tl, full.start, end)


def positive_item_counts(ds: Dataset, view: TimelineView) -> np.ndarray:
    """How often each item was a positive action inside the view's ranges: the most-popular baseline's scores."""
    tl = view.base
    edges = np.zeros(tl.n_events + 1, dtype=np.int64)  # +1 where a range starts, -1 where it ends
    np.add.at(edges, view.start, 1)
    np.add.at(edges, view.end, -1)
    inside = np.cumsum(edges[:-1]) > 0
    positive = np.isin(np.asarray(tl.action), np.array(ds.manifest.positive_codes))
    return np.bincount(np.asarray(tl.item)[inside & positive], minlength=ds.manifest.n_items).astype(np.float64)
