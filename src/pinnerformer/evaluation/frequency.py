"""Inference frequency (the PinnerFormer paper's "realtime vs daily" study): Recall@k when the embedding in use at
each label's time was computed once (at the cut-off), after every action (realtime), or daily (at each day
boundary, one day late, as a daily batch job serves it)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from pinnerformer.data.clock import DAY
from pinnerformer.data.dataset import Dataset
from pinnerformer.evaluation.metrics import label_ranks
from pinnerformer.evaluation.tasks import EvalTask
from pinnerformer.models.embedding import embed_users
from pinnerformer.models.pinnerformer import PinnerFormer

Frequency = Literal["once", "daily", "realtime"]
FREQUENCIES = list(Frequency.__args__)


def label_occurrences(ds: Dataset, task: EvalTask, label_days: float) -> list[np.ndarray]:
    """Per user-window: the event index of each label's first positive occurrence in the window."""
    tl = ds.timelines
    pos = np.array(ds.manifest.positive_codes)
    horizon = int(label_days * DAY)
    out = []
    for e, t, labels in zip(task.ends, task.cutoff, task.labels):
        u_end = int(tl.offsets[np.searchsorted(tl.offsets, e, side="right")])
        stop = e + int(np.searchsorted(np.asarray(tl.ts[e:u_end]), t + horizon, side="left"))
        items, acts = np.asarray(tl.item[e:stop]), np.asarray(tl.action[e:stop])
        first = {}
        for j in np.flatnonzero(np.isin(acts, pos)):
            first.setdefault(int(items[j]), e + int(j))
        out.append(np.array([first[int(x)] for x in labels], dtype=np.int64))
    return out


def frequency_recall(model: PinnerFormer, ds: Dataset, task: EvalTask, items: torch.Tensor, frequency: str,
                     label_days: float, k: int) -> np.ndarray:
    """Per user-window Recall@k when the embedding in use at each label's time is refreshed at `frequency`."""
    tl = ds.timelines
    occ = label_occurrences(ds, task, label_days)
    rows_w, rows_l, ends = [], [], []
    for w, (s, e, idx) in enumerate(zip(task.starts, task.ends, occ)):
        for li, j in enumerate(idx):
            if frequency == "once":
                end = e
            elif frequency == "realtime":
                end = j  # every action before the label's own
            else:  # the snapshot served on the label's day was built from data up to the day before it
                day_start = (int(tl.ts[j]) // DAY) * DAY
                end = s + int(np.searchsorted(np.asarray(tl.ts[s:j]), day_start - DAY, side="left"))
            rows_w.append(w)
            rows_l.append(li)
            ends.append(max(end, s + 1))  # at least one action, as at the cut-off
    starts = task.starts[np.array(rows_w)]
    users = embed_users(model, tl, starts, np.array(ends, dtype=np.int64), torch.device("cpu"))
    hits = [np.zeros(len(x)) for x in task.labels]
    for i in range(0, len(rows_w), 512):
        scores = users[i:i + 512] @ items.T
        for r in range(scores.shape[0]):
            w, li = rows_w[i + r], rows_l[i + r]
            hits[w][li] = label_ranks(scores[r:r + 1], [task.labels[w]])[0][li] < k
    return np.array([h.mean() for h in hits])
