"""The one scorer: every retrieval metric of a task, for any way of scoring items (model vectors or baselines).

A row of a task is scored against every item (or a seeded random pool of items plus its labels: everything else
is outside the index), each label ranked against the items minus the row's other labels, ties pessimistic
(`metrics.label_ranks`). With `exclude_history` the items of the row's input (its history) are removed from the
ranking, as the S3-Rec / ICLRec / eSASRec line of papers does for leave-one-out; a label that is itself in the
history is then unrankable and counts as a miss (they are counted).

Baselines are scorers too: most-popular (positives in every user's training part for leave-one-out, in the 28 days
before each cut-off for future-window) and, when the dataset has content vectors, the mean of the user's last 20
item vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pinnerformer.config import StrictModel
from pinnerformer.data.clock import DAY
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.timelines import Timelines, TimelineView
from pinnerformer.evaluation.metrics import (
    ENTROPY_TOP, INTEREST_ENTROPY, P90_COVERAGE, PER_USER, bootstrap_ci, interest_entropy, label_ranks, metric_name,
    p90_coverage,
)
from pinnerformer.evaluation.protocols import positive_item_counts
from pinnerformer.evaluation.tasks import EvalTask


class MetricValue(StrictModel):
    mean: float
    ci95: list[float] | None  # 95% bootstrap interval over rows (users or user-windows); None for global metrics


@dataclass
class Scorer:
    """Scores of items for the rows of a task: user vectors · item vectors, fixed scores per row or per item, or a
    function of the rows (a blend computed a batch at a time)."""

    name: str
    users: torch.Tensor | None  # [U, D] user vectors, or None for fixed scores
    items: torch.Tensor | None  # [I, D]
    fixed: torch.Tensor | None = None  # [U, I] or [I] fixed scores
    rows_fn: Callable[[slice], torch.Tensor] | None = None  # rows -> [rows, I] scores

    def scores(self, rows: slice) -> torch.Tensor:
        if self.rows_fn is not None:
            return self.rows_fn(rows)
        if self.fixed is None:
            return self.users[rows] @ self.items.T
        if self.fixed.ndim == 2:
            return self.fixed[rows]
        return self.fixed.unsqueeze(0).expand(rows.stop - rows.start, -1)


@dataclass
class Ranked:
    ranks: list[np.ndarray]  # per row: each label's 0-based rank
    top: np.ndarray | None  # [rows, n] the top-n items per row, when asked for
    labels_in_history: int  # labels removed from the ranking with the history (exclude_history)
    index_size: int


def history_items(tl: Timelines, task: EvalTask, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """(row offset, item) for every action in the input range of the task's rows."""
    starts, ends = task.starts[rows], task.ends[rows]
    lengths = ends - starts
    row = np.repeat(np.arange(len(starts)), lengths)
    idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return row, np.asarray(tl.item[idx]).astype(np.int64)


def rank_task(task: EvalTask, scorer: Scorer, top: int = 0, pool: np.ndarray | None = None,
              history: Timelines | None = None, batch: int = 512,
              advance: Callable[[int], object] | None = None) -> Ranked:
    """Each label's rank, and (top > 0) each row's top items. history: the timelines whose input items are
    removed from the ranking (None: history stays in). advance: told how many rows each batch ranked (a progress
    bar's update)."""
    ranks, tops, in_history = [], [], 0
    pool_t = None if pool is None else torch.from_numpy(pool)
    n_items = None
    for i in range(0, len(task), batch):
        rows = slice(i, min(i + batch, len(task)))
        s = scorer.scores(rows).double()
        n_items = s.shape[1]
        labels = task.labels[rows]
        if pool_t is not None or history is not None:
            s = s.clone()
        if pool_t is not None:
            # score only pool items and the labels: everything else is outside the index
            in_index = torch.zeros(s.shape[1], dtype=torch.bool)
            in_index[pool_t] = True
            for r, lab in enumerate(labels):
                keep = in_index.clone()
                keep[torch.from_numpy(lab)] = True
                s[r, ~keep] = -torch.inf
        if history is not None:
            r, it = history_items(history, task, rows)
            s[torch.from_numpy(r), torch.from_numpy(it)] = -torch.inf
            bounds = np.searchsorted(r, np.arange(len(labels) + 1))  # row j's history: it[bounds[j]:bounds[j + 1]]
            in_history += sum(int(np.isin(lab, it[bounds[j]:bounds[j + 1]]).sum()) for j, lab in enumerate(labels))
        ranks += label_ranks(s, labels)
        if top:
            tops.append(torch.topk(s, min(top, s.shape[1]), dim=1).indices.numpy())
        if advance is not None:
            advance(len(labels))
    index_size = len(pool) if pool is not None else (n_items or 0)
    return Ranked(ranks, np.concatenate(tops) if tops else None, in_history, index_size)


def score_task(task: EvalTask, scorer: Scorer, k: int, metrics: list[str], interests: list[list[str]] | None = None,
               pool: np.ndarray | None = None, history: Timelines | None = None,
               intervals: bool = True, advance: Callable[[int], object] | None = None
               ) -> tuple[dict[str, MetricValue], Ranked]:
    """Per-row metrics (`metrics`, names from `evaluation.metrics.PER_USER`) averaged over rows, with 95% bootstrap
    intervals when `intervals`; with intervals also interest-entropy@50 (when items have interests) and
    p90-coverage@k, the report's diversity metrics. advance: as rank_task's."""
    ranked = rank_task(task, scorer, top=ENTROPY_TOP if intervals else 0, pool=pool, history=history,
                       advance=advance)
    per = {metric_name(m, k): PER_USER[m](ranked.ranks, k) for m in metrics}
    if intervals and interests is not None:
        per[metric_name(INTEREST_ENTROPY, ENTROPY_TOP)] = interest_entropy(ranked.top, interests)
    out = {name: MetricValue(mean=float(np.nanmean(v)), ci95=list(bootstrap_ci(v)) if intervals else None)
           for name, v in per.items()}
    if intervals:
        out[metric_name(P90_COVERAGE, k)] = MetricValue(mean=p90_coverage(ranked.top[:, :k], ranked.index_size),
                                                        ci95=None)
    return out, ranked


def popularity_scores(ds: Dataset, task: EvalTask, protocol: str, view: TimelineView | None = None,
                      trailing_days: float = 28.0) -> torch.Tensor:
    """Most-popular scores: positives inside `view` (one score per item; default for leave-one-out: every user's
    training part), or, for future-window, in the trailing window before each row's cut-off (a score per row)."""
    tl = ds.timelines
    if protocol == "leave-one-out" or view is not None:
        return torch.from_numpy(positive_item_counts(ds, view if view is not None else tl.drop_last(2)))
    rows = {int(t): positive_item_counts(ds, TimelineView(tl, tl.as_of(int(t - trailing_days * DAY)).end,
                                                          tl.as_of(int(t)).end))
            for t in np.unique(task.cutoff)}
    return torch.from_numpy(np.stack([rows[int(t)] for t in task.cutoff]))


def content_user_vectors(ds: Dataset, task: EvalTask, last: int = 20) -> torch.Tensor | None:
    """The mean of each row's last `last` input items' content vectors (normalised), or None without vectors."""
    cv = ds.content_vectors()
    if cv is None:
        return None
    tl = ds.timelines
    out = np.zeros((len(task), cv.shape[1]), dtype=np.float32)
    for i, (s, e) in enumerate(zip(task.starts, task.ends)):
        out[i] = cv[np.asarray(tl.item[max(s, e - last):e])].mean(0)
    return torch.nn.functional.normalize(torch.from_numpy(out), dim=-1)
