"""Offline evaluation of a trained model on held-out data, beside baselines scored by the same code.

future-window (the PinnerFormer paper's protocol): the evaluation users are held-out users (disjoint from training
users); for a cut-off time t, each eligible user is embedded from their actions before t and labelled with the
distinct items of their positive actions in [t, t + label_days) (`evaluation.tasks`). Several cut-offs can be
pooled. Metrics, each with a 95% bootstrap interval over user-windows:
    recall@k              per user-window, the share of labels ranked in the top k of the index; each label
                          competes with the index minus the user's other labels; then the mean over windows
    interest-entropy@50   entropy (nats) of the interests of the top-50 items, mean over windows
    p90-coverage@k        the smallest share of the index that fills 90% of all top-k slots
The index is the whole catalogue, or a seeded random pool of N items (the labels are added to it).

leave-one-out: the last item of every user is the test target (the second-to-last was validation); hr@k and
ndcg@k against all items, ties counted pessimistically; history stays in the ranking unless `exclude_history`.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import portable_path
from pinnerformer.evaluation.frequency import Frequency, frequency_recall
from pinnerformer.evaluation.blend import Blend, BlendChoice, check_blend_applies, fit_knn
from pinnerformer.evaluation.metrics import RECALL, bootstrap_ci, metric_name
from pinnerformer.evaluation.protocols import REPORTED, Protocol, resolve_protocol
from pinnerformer.evaluation.report import MODEL, EvaluationReport, InferenceFrequency, users_sha256
from pinnerformer.evaluation.scorer import MetricValue, Scorer, content_user_vectors, popularity_scores, score_task
from pinnerformer.evaluation.tasks import default_cutoff, future_window_task, leave_one_out_task, parse_cutoffs
from pinnerformer.models.embedding import embed_items, embed_users
from pinnerformer.models.pinnerformer import PinnerFormer
from pinnerformer.progress import progress_bar


class EvaluateOptions(StrictModel):
    protocol: Protocol | None = None  # None: the run's
    split: Literal["test", "validation"] = "test"
    cutoffs: list[str] | None = None  # future-window cut-off days YYYY-MM-DD, pooled (None: the best single day)
    label_days: float = Field(14.0, gt=0)
    k: int = Field(10, ge=1)
    index_size: int | None = Field(None, ge=1)  # rank against a seeded random pool of N items (None: all)
    checkpoint: str = "best"
    seed: int = 0
    frequency: list[Frequency] | None = None  # inference frequencies to compare (future-window)
    exclude_history: bool = False  # remove each user's input items from the ranking (the literature's LOO)
    per_user_cutoffs: bool = False  # future-window: each user at a (seeded) cut-off of their own, not one day


MIN_USERS = 30  # fewer scored users than this: a warning (and, for one cut-off, per-user cut-offs instead)


def evaluate_model(model: PinnerFormer, ds: Dataset, protocol: Protocol, options: EvaluateOptions,
                   held_out: np.ndarray | None, run: str = "", log=print,
                   blend: BlendChoice | None = None, progress: bool = False) -> EvaluationReport:
    """held_out: the dataset indices of the users held out from training (None: the run trained on every user's
    early actions, as leave-one-out runs do). blend (leave-one-out): the model scored is the network mixed with
    item-to-item neighbours at the chosen λ (`evaluation.blend`); the network alone and the neighbours alone are
    reported beside it. progress: a bar over the rows every scorer ranks."""
    t0 = time.perf_counter()
    o, m = options, ds.manifest
    cutoffs = parse_cutoffs(o.cutoffs, ds)
    protocol = resolve_protocol(protocol, m.clock)
    warnings: list[str] = []
    if protocol == "future-window":
        per_user = o.per_user_cutoffs
        if cutoffs is None and not per_user:
            t, n = default_cutoff(ds, held_out, o.label_days)
            cutoffs = [t]
            log(f"default cut-off {dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%d}: {n} of {len(held_out)} "
                f"{o.split} users eligible (the day that makes the most users eligible)")
            if n < MIN_USERS:
                per_user, cutoffs = True, None
                warnings.append(f"a single cut-off leaves only {n} {o.split} user(s) eligible (users' activity "
                                "does not overlap in time): each user is scored at a cut-off of their own instead "
                                "(--per-user-cutoffs)")
                log("note: " + warnings[-1])
        if per_user:  # each user's own cut-off, drawn (seeded) among the times that make them eligible
            task = future_window_task(ds, held_out, o.label_days, f"future-window/{o.split}", seed=o.seed)
        else:
            task = future_window_task(ds, held_out, o.label_days, f"future-window/{o.split}", cutoffs=cutoffs)
        if len(task) == 0:
            raise PinnerformerError(f"no {o.split} user is eligible at the cut-off(s): nobody has an action before "
                                    f"and a positive within {o.label_days:g} days after; choose another --cutoff")
    else:  # a run trained on some users only (future-window) is scored on its held-out ones, never on its own
        task = leave_one_out_task(ds, o.split, among=held_out)
    if len(task) < MIN_USERS:
        warnings.append(f"only {len(task)} user-window(s) scored: numbers this small are noise (see the intervals)")
        log("warning: " + warnings[-1])
    dev = torch.device("cpu")
    if blend is not None:
        check_blend_applies(protocol, held_out)
        # a λ carried over from another run (chosen_by) is a refit's: its neighbours see what the refit saw
        parts = Blend(model, ds, task, fit_knn(ds, blend.knn, refit=blend.chosen_by is not None))
        scorers = [parts.scorer(MODEL, blend.weight), parts.network(), parts.neighbours()]
    else:
        scorers = [Scorer(MODEL, embed_users(model, ds.timelines, task.starts, task.ends, dev),
                          embed_items(model, dev))]
    scorers.append(Scorer("most-popular", None, None, fixed=popularity_scores(ds, task, protocol)))
    cu = content_user_vectors(ds, task)
    if cu is not None:
        scorers.append(Scorer("content (mean of last 20 item vectors)", cu, torch.from_numpy(ds.content_vectors())))
    interests = ds.items.sort("item")["interests"].to_list()
    pool = None
    if o.index_size is not None and o.index_size < m.n_items:
        pool = np.sort(np.random.default_rng(o.seed).choice(m.n_items, o.index_size, replace=False))
    history = ds.timelines if o.exclude_history else None
    results, in_history = {}, None
    with progress_bar(total=len(task) * len(scorers), desc=f"scoring {o.split} users ({len(scorers)} scorers)",
                      unit="row", disable=not progress) as bar:
        for s in scorers:
            results[s.name], ranked = score_task(task, s, o.k, REPORTED[protocol],
                                                 interests if any(len(x) for x in interests) else None, pool,
                                                 history, advance=bar.update)
            in_history = ranked.labels_in_history if history is not None else None
    return EvaluationReport(
        run=run, dataset=portable_path(ds.path), fingerprint=m.fingerprint, protocol=protocol, split=o.split, k=o.k,
        checkpoint=o.checkpoint,
        index=f"random pool of {o.index_size} items (seed {o.seed}) + the labels" if pool is not None
        else f"whole catalogue ({m.n_items} items)",
        cutoffs=None if protocol != "future-window" or cutoffs is None else
        [f"{dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%d}" for t in cutoffs],
        per_user_cutoffs=protocol == "future-window" and cutoffs is None, warnings=warnings,
        label_days=o.label_days if protocol == "future-window" else None, user_windows=len(task),
        distinct_users=len(np.unique(task.users)), users_sha256=users_sha256(task.users), results=results,
        inference_frequency=_frequencies(model, ds, task, scorers[0].items, protocol, pool, o) if o.frequency
        else None, blend=blend,
        wall_s=round(time.perf_counter() - t0, 1), history_excluded=o.exclude_history, labels_in_history=in_history,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def _frequencies(model, ds: Dataset, task, items: torch.Tensor, protocol: str, pool, o: EvaluateOptions
                 ) -> InferenceFrequency:
    if protocol != "future-window" or pool is not None or o.exclude_history:
        raise PinnerformerError("--frequency takes once, daily and/or realtime, with the future-window protocol "
                                "and the whole catalogue as index (history kept)")
    name = metric_name(RECALL, o.k)
    results = {}
    for f in o.frequency:
        v = frequency_recall(model, ds, task, items, f, o.label_days, o.k)
        results[f] = MetricValue(mean=float(np.nanmean(v)), ci95=list(bootstrap_ci(v)))
    drop = None
    if "realtime" in results and "daily" in results:
        rt, dl = results["realtime"].mean, results["daily"].mean
        drop = (dl - rt) / rt if rt else None
    return InferenceFrequency(metric=name, results=results, realtime_to_daily_drop=drop)
