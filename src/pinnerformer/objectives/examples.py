"""Training examples cut from user timelines on the fly, for the four objectives of the PinnerFormer paper.

An example is (user, cut-off c): the input is the last M actions before c, i.e. events [max(s, c-M), c) of the
user's training range [s, e); labels are positive actions after the relevant position:

    next-action        newest position -> the first positive at index >= c
    sasrec             every position i -> the first positive after i
    all-action         newest position -> up to `max_labels` positives in the window after it
    dense-all-action   `positions` sampled positions i -> `labels_per_position` random positives in the
                       window after i (the window after *that position's* time, so it needs the causal mask)

The window is K days after the position's timestamp (28 by default), or K actions for order-only data.
A query is (example, position, label item); the loss treats every query as one softmax.
c is drawn uniformly from the cut-offs that leave at least one action before and one positive after
(cutoff="random"), or is the latest such cut-off (cutoff="last": the whole training sequence, as SASRec trains).
With `crop` > 0 an example's input may be a random contiguous run of its window instead (augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from pinnerformer.config import StrictModel
from pinnerformer.data.clock import DAY
from pinnerformer.data.timelines import Timelines, TimelineView

Objective = Literal["dense-all-action", "all-action", "sasrec", "next-action"]
OBJECTIVES = list(Objective.__args__)


class ExampleConfig(StrictModel):
    """How examples are cut: the `data` section of a training config."""

    max_len: int = Field(64, ge=1)  # M: actions per input sequence
    # set: M is fitted to the data before training (training/retrieval.py, `fitted_max_len`): the 90th percentile
    # of the users' timeline lengths, no shorter than max_len and no longer than this cap. SASRec's M is 50 on
    # Amazon's short sequences and 200 on MovieLens' long ones; a fixed 50 leaves most of a long timeline unread.
    max_len_cap: int | None = Field(None, ge=1)
    positions: int = Field(16, ge=1)  # dense-all-action: positions sampled per sequence
    labels_per_position: int = Field(1, ge=1)  # dense-all-action
    max_labels: int = Field(32, ge=1)  # all-action: labels per sequence
    sequences_per_user: int = Field(4, ge=1)  # examples per training user per epoch
    window_days: float = Field(28.0, gt=0)  # K, for real clocks
    window_actions: int = Field(20, ge=1)  # K, for order-only clocks
    cutoff: Literal["random", "last"] = "random"  # example cut-off: random, or the end of the training range
    # > 0: batches of users of similar length, sorted within runs of this many batches (training/task.py,
    # `length_bucketed`): less padding on CPU, where batches are padded to their longest sequence; 0: off
    length_buckets: int = Field(0, ge=0)
    # augmentation: the probability that an example's input is a random crop of its window (a contiguous run of
    # at least `crop_min` of its actions, placed at random) instead of the whole window; the labels stay "the next
    # positive" of each position. Against memorising the same whole sequences every epoch (cutoff=last).
    crop: float = Field(0.0, ge=0, le=1)
    crop_min: float = Field(0.5, gt=0, le=1)  # the shortest crop, as a fraction of the window

    @model_validator(mode="after")
    def _cap_above_floor(self):
        if self.max_len_cap is not None and self.max_len_cap < self.max_len:
            raise ValueError(f"max_len_cap {self.max_len_cap} is below max_len {self.max_len}: the cap bounds the "
                             "fitted M from above, max_len from below")
        return self


@dataclass
class ExampleBatch:
    users: np.ndarray  # [B]
    starts: np.ndarray  # [B] global event index of the first input action
    ends: np.ndarray  # [B] one past the newest input action (the cut-off index c)
    q_example: np.ndarray  # [Q] which example a query belongs to
    q_position: np.ndarray  # [Q] position in the (right-padded) sequence
    q_item: np.ndarray  # [Q] label item
    label_example: np.ndarray  # [P] every (example, positive item) pair in the labels: for masking negatives
    label_item: np.ndarray


def one_query_per_label(ex: np.ndarray, pos: np.ndarray, labels: list[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example, position) pairs with a label array each -> one (example, position, label) row per label."""
    per = np.array([len(x) for x in labels], dtype=np.int64)
    lab = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    return np.repeat(ex, per).astype(np.int64), np.repeat(pos, per).astype(np.int64), lab


class ExampleSampler:
    def __init__(self, tl: Timelines, positive_codes: np.ndarray, view: TimelineView, cfg: ExampleConfig,
                 objective: Objective = "dense-all-action"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        self.tl, self.view, self.cfg, self.objective = tl, view, cfg, objective
        # K: seconds after the position on a real clock, a number of actions on an order-only one
        self.window_in_actions = tl.clock == "order"
        self.window = cfg.window_actions if self.window_in_actions else cfg.window_days * float(DAY)
        is_pos = np.isin(np.asarray(tl.action), positive_codes)
        self.pos_idx = np.flatnonzero(is_pos)  # global indices of positive events, ascending
        self.cum_pos = np.concatenate([[0], np.cumsum(is_pos)])  # positives in events [0, j)
        # last positive inside each user's training range: the latest cut-off that still has a label
        n_pos_before_end = self.cum_pos[view.end]
        has = n_pos_before_end > self.cum_pos[view.start]
        last_pos = np.where(has, self.pos_idx[np.maximum(n_pos_before_end - 1, 0)], -1)
        self.lo = view.start + 1
        self.hi = last_pos  # c in [lo, hi]: an action before, a positive at or after c
        self.eligible = np.flatnonzero(has & (self.hi >= self.lo))

    def _window_end(self, s: int, e: int, i: np.ndarray) -> np.ndarray:
        """One past the last event inside the label window after positions i (global indices)."""
        if self.window_in_actions:
            return np.minimum(i + 1 + int(self.window), e)
        ts = self.tl.ts[s:e]
        return s + np.searchsorted(ts, ts[i - s] + self.window, side="right")

    def _random_positives(self, rng, first: np.ndarray, stop: np.ndarray, k: int) -> list[np.ndarray]:
        """For each window [first, stop) of global indices: up to k distinct positives, chosen at random."""
        a, b = self.cum_pos[first], self.cum_pos[np.maximum(stop, first)]
        out = []
        for lo, hi in zip(a, b):
            n = hi - lo
            if n <= k:
                out.append(self.pos_idx[lo:hi])
            else:
                out.append(self.pos_idx[lo + rng.choice(n, k, replace=False)])
        return out

    def _dense_queries(self, rng, s: np.ndarray, c: np.ndarray, s_u: np.ndarray, e_u: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """dense-all-action for a whole batch at once: per example, min(positions, c - s) distinct positions in
        [s, c), uniformly at random, each with up to labels_per_position random positives from its window.
        Returns (example, global position, global label index) per query, ordered by example, then position."""
        cfg = self.cfg
        B, n = len(s), c - s  # n >= 1
        if B == 0:
            return (np.zeros(0, np.int64),) * 3
        # distinct positions: the smallest `positions` of uniform keys over each example's n slots (a uniformly
        # random subset), slots past n keyed +inf so they are taken only when n < positions, and then dropped
        keys = rng.random((B, int(n.max())))
        keys[np.arange(keys.shape[1])[None, :] >= n[:, None]] = np.inf
        slot = np.sort(np.argsort(keys, axis=1)[:, :cfg.positions], axis=1)
        keep = slot < n[:, None]
        ex = np.broadcast_to(np.arange(B)[:, None], slot.shape)[keep]
        pos = (s[:, None] + slot)[keep]
        stop = np.empty_like(pos)
        bounds = np.searchsorted(ex, np.arange(B + 1))
        for b in range(B):  # the window's end, searched within the example's own timeline
            lo, hi = bounds[b], bounds[b + 1]
            stop[lo:hi] = self._window_end(int(s_u[b]), int(e_u[b]), pos[lo:hi])
        first = pos + 1
        a, z = self.cum_pos[first], self.cum_pos[np.maximum(stop, first)]
        cnt = z - a  # positives in each position's window
        if cfg.labels_per_position == 1:
            has = cnt > 0
            j = self.pos_idx[a[has] + rng.integers(0, cnt[has])]
            return ex[has], pos[has], j
        return one_query_per_label(ex, pos, self._random_positives(rng, first, stop, cfg.labels_per_position))

    def _crop(self, rng, starts: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each example, with probability `crop`: a uniformly placed window of n' actions of its n, n' uniform in
        [ceil(crop_min * n), n]. Drawn for every example (one random stream whatever is cropped)."""
        n = c - starts
        crop = rng.random(len(n)) < self.cfg.crop
        shortest = np.maximum(np.ceil(self.cfg.crop_min * n), 1).astype(np.int64)
        length = shortest + np.floor(rng.random(len(n)) * (n - shortest + 1)).astype(np.int64)
        offset = np.floor(rng.random(len(n)) * (n - length + 1)).astype(np.int64)
        new_start = np.where(crop, starts + offset, starts)
        return new_start, np.where(crop, new_start + length, c)

    def sample(self, users: np.ndarray, rng: np.random.Generator) -> ExampleBatch:
        cfg, tl = self.cfg, self.tl
        item = tl.item
        users = np.asarray(users)
        s_u, e_u = self.view.start[users].astype(np.int64), self.view.end[users].astype(np.int64)
        c = (self.hi[users] if cfg.cutoff == "last" else rng.integers(self.lo[users], self.hi[users] + 1)
             ).astype(np.int64)
        starts = np.maximum(s_u, c - cfg.max_len)
        if cfg.crop > 0:
            starts, c = self._crop(rng, starts, c)
        if self.objective == "dense-all-action":
            q_example, q_pos, q_lab = self._dense_queries(rng, starts, c, s_u, e_u)
        else:
            qe, qp, ql = [], [], []  # per user: example index and position per position, a label array each
            for b in range(len(users)):
                s, cb, eb = int(starts[b]), int(c[b]), int(e_u[b])
                if self.objective == "next-action":
                    pos = np.array([cb - 1])
                    labels = [self.pos_idx[self.cum_pos[cb]:self.cum_pos[cb] + 1]]
                elif self.objective == "sasrec":
                    pos = np.arange(s, cb)
                    nxt = self.cum_pos[pos + 1]  # index into pos_idx of the first positive after each position
                    ok = nxt < len(self.pos_idx)
                    ok[ok] = self.pos_idx[nxt[ok]] < eb
                    pos = pos[ok]
                    labels = [self.pos_idx[n:n + 1] for n in nxt[ok]]
                else:  # all-action
                    pos = np.array([cb - 1])
                    labels = self._random_positives(rng, pos + 1, self._window_end(int(s_u[b]), eb, pos),
                                                    cfg.max_labels)
                qe.append(np.full(len(pos), b, np.int64))
                qp.append(pos)
                ql.extend(labels)
            q_example, q_pos, q_lab = one_query_per_label(np.concatenate(qe) if qe else np.zeros(0, np.int64),
                                                          np.concatenate(qp) if qp else np.zeros(0, np.int64), ql)
        q_item = np.asarray(item)[q_lab].astype(np.int64)
        # (example, item) pairs: every label of the example is one of "the user's own positives"
        pairs = (np.unique(np.stack([q_example, q_item], 1), axis=0) if len(q_example)
                 else np.zeros((0, 2), np.int64))
        return ExampleBatch(users=users, starts=starts, ends=c, q_example=q_example,
                            q_position=q_pos - starts[q_example], q_item=q_item,
                            label_example=pairs[:, 0], label_item=pairs[:, 1])
