"""`pinnerformer evaluate`: a trained run, scored on held-out data, beside baselines scored by the same code.

future-window (SPEC §3): evaluation users are the run's held-out *test* users (disjoint from training users;
the split is read from the run). For a cut-off time t, a user is eligible when they have an action before t and
a positive action in [t, t + label_days). Their embedding is computed from the actions before t; the labels are
the distinct positive items in the window. Several cut-offs can be pooled: each (user, cut-off) window counts
once. Metrics, each with a 95% bootstrap interval over user-windows:
    Recall@k             per user-window, the share of labels ranked in the top k of the index; each label
                         competes with the index minus the user's other labels; then the mean over windows
    Interest Entropy@50  entropy (nats) of the interests of the top-50 items, mean over windows
    P90 Coverage@k       the smallest share of the index that fills 90% of all top-k slots
The index is the whole catalogue, or a seeded random pool of N items (the labels are added to it).

leave-one-out: the last item of every user is the test target (the second-to-last was validation); HR@k and
NDCG@k against all items, history not excluded, ties counted pessimistically.

Baselines: most-popular (positives in the 28 days before the cut-off for future-window; all training
positives for leave-one-out) and, when the dataset has content vectors, the mean of the user's last 20 item
vectors.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.metrics import (
    bootstrap_ci, hit_rate_at_k, interest_entropy, label_ranks, ndcg_at_k, p90_coverage, recall_at_k,
)
from pinnerformer.data.timelines import TimelineView
from pinnerformer.evaluation.protocols import EvalTask, leave_one_out_task, positive_item_counts

DAY = 86400


@dataclass
class Scorer:
    name: str
    users: torch.Tensor | None  # [U, D] user vectors, or None for a fixed item score
    items: torch.Tensor | None  # [I, D]
    fixed: torch.Tensor | None = None  # [U, I] or [I] fixed scores

    def scores(self, rows: slice) -> torch.Tensor:
        if self.fixed is None:
            return self.users[rows] @ self.items.T
        if self.fixed.ndim == 2:
            return self.fixed[rows]
        return self.fixed.unsqueeze(0).expand(rows.stop - rows.start, -1)


def load_run(run_dir: Path, ds: Dataset, checkpoint: str = "best"):
    """The trained model of a run, after checking that it was trained on this very dataset."""
    from pinnerformer.training.config import TrainConfig
    from pinnerformer.training.trainer import build_model

    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise PinnerformerError(f"{run_dir}: not a training run (no config.json)")
    desc = json.loads(path.read_text())
    if desc["dataset"]["fingerprint"] != ds.manifest.fingerprint:
        raise PinnerformerError(
            f"{run_dir} was trained on a different dataset: its fingerprint is {desc['dataset']['fingerprint']}, "
            f"{ds.path} has {ds.manifest.fingerprint}")
    ck_path = Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"
    if not ck_path.exists():
        raise PinnerformerError(f"{ck_path} does not exist (did the run finish an epoch?)")
    cfg = TrainConfig.model_validate(desc["config"])
    model, _ = build_model(ds, cfg)
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    model.load_state_dict(ck["model"])
    return model.eval(), desc


def held_out_users(run_dir: Path, split: str = "test") -> np.ndarray:
    """Dataset indices of the run's held-out users (future-window runs record their user split)."""
    path = Path(run_dir) / "split.parquet"
    if not path.exists():
        raise PinnerformerError(f"{run_dir} has no user split (trained with leave-one-out?): future-window "
                                "evaluation needs users held out from training")
    return np.flatnonzero((pl.read_parquet(path)["split"] == split).to_numpy())


def parse_cutoffs(text: str | None, ds: Dataset) -> list[int] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        try:
            t = int(dt.datetime.strptime(part.strip(), "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp())
        except ValueError:
            raise PinnerformerError(f"cut-off {part!r} is not a date (expected YYYY-MM-DD)") from None
        if not ds.manifest.time_min < t <= ds.manifest.time_max:
            raise PinnerformerError(f"cut-off {part} is outside the data's time range ({ds.manifest.time_range_text()})")
        out.append(t)
    return out


def eligible_windows(ds: Dataset, users: np.ndarray, t: int, label_days: float):
    """Per user: (input end index, label items) when eligible at cut-off t, else None."""
    tl = ds.timelines
    pos = np.array(ds.manifest.positive_codes)
    horizon = int(label_days * DAY)
    out = []
    for u in users:
        s, e = int(tl.offsets[u]), int(tl.offsets[u + 1])
        ts = np.asarray(tl.ts[s:e])
        a = int(np.searchsorted(ts, t, side="left"))
        b = int(np.searchsorted(ts, t + horizon, side="left"))
        if a == 0 or b == a:
            out.append(None)
            continue
        it = np.asarray(tl.item[s + a:s + b])[np.isin(np.asarray(tl.action[s + a:s + b]), pos)]
        out.append((s + a, np.unique(it).astype(np.int64)) if len(it) else None)
    return out


def default_cutoff(ds: Dataset, users: np.ndarray, label_days: float) -> tuple[int, int]:
    """The day boundary (UTC midnight) that makes the most evaluation users eligible, and that count."""
    m = ds.manifest
    days = np.arange((m.time_min // DAY + 1) * DAY, m.time_max, DAY)
    grid = days[:: max(1, len(days) // 200)]  # at most ~200 candidates: cheap, and fine enough
    counts = [sum(w is not None for w in eligible_windows(ds, users, int(t), label_days)) for t in grid]
    best = int(np.argmax(counts))
    return int(grid[best]), int(counts[best])


def future_window_eval_task(ds: Dataset, users: np.ndarray, cutoffs: list[int], label_days: float) -> EvalTask:
    tl = ds.timelines
    u_out, s_out, e_out, t_out, labels = [], [], [], [], []
    for t in cutoffs:
        for u, w in zip(users, eligible_windows(ds, users, t, label_days)):
            if w is not None:
                u_out.append(u)
                s_out.append(int(tl.offsets[u]))
                e_out.append(w[0])
                t_out.append(t)
                labels.append(w[1])
    return EvalTask("future-window/test", np.array(u_out, dtype=np.int64), np.array(s_out, dtype=np.int64),
                    np.array(e_out, dtype=np.int64), labels, np.array(t_out, dtype=np.int64))


FREQUENCIES = ["once", "realtime", "daily"]


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


def frequency_recall(model, ds: Dataset, task: EvalTask, items: torch.Tensor, frequency: str, label_days: float,
                     k: int) -> np.ndarray:
    """Per user-window Recall@k when the embedding in use at each label's time is refreshed
    once (at the cut-off), realtime (after every action) or daily (at each day boundary, one day late)."""
    from pinnerformer.training.trainer import embed_users

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
    users = embed_users(model, ds, starts, np.array(ends, dtype=np.int64), torch.device("cpu"))
    hits = [np.zeros(len(x)) for x in task.labels]
    for i in range(0, len(rows_w), 512):
        scores = users[i:i + 512] @ items.T
        for r in range(scores.shape[0]):
            w, li = rows_w[i + r], rows_l[i + r]
            hits[w][li] = label_ranks(scores[r:r + 1], [task.labels[w]])[0][li] < k
    return np.array([h.mean() for h in hits])


def popularity_scores(ds: Dataset, task: EvalTask, protocol: str, trailing_days: float = 28.0) -> torch.Tensor:
    """Most-popular scores: positives in every user's training part (leave-one-out), or in the trailing
    window before each user-window's cut-off (future-window)."""
    tl = ds.timelines
    if protocol == "leave-one-out":
        return torch.from_numpy(positive_item_counts(ds, tl.drop_last(2)))
    rows = {int(t): positive_item_counts(ds, TimelineView(tl, tl.as_of(int(t - trailing_days * DAY)).end,
                                                          tl.as_of(int(t)).end))
            for t in np.unique(task.cutoff)}
    return torch.from_numpy(np.stack([rows[int(t)] for t in task.cutoff]))


def content_user_vectors(ds: Dataset, task: EvalTask, last: int = 20) -> torch.Tensor | None:
    cv = ds.content_vectors()
    if cv is None:
        return None
    tl = ds.timelines
    out = np.zeros((len(task), cv.shape[1]), dtype=np.float32)
    for i, (s, e) in enumerate(zip(task.starts, task.ends)):
        out[i] = cv[np.asarray(tl.item[max(s, e - last):e])].mean(0)
    return torch.nn.functional.normalize(torch.from_numpy(out), dim=-1)


def score_task(scorer: Scorer, task: EvalTask, k: int, interests: list[list[str]] | None, pool: np.ndarray | None,
               protocol: str, batch: int = 512) -> dict:
    ranks, tops10, tops50 = [], [], []
    pool_t = None if pool is None else torch.from_numpy(pool)
    for i in range(0, len(task), batch):
        rows = slice(i, min(i + batch, len(task)))
        s = scorer.scores(rows).double()
        labels = task.labels[rows]
        if pool_t is not None:
            # score only pool items and the labels: everything else is outside the index
            in_index = torch.zeros(s.shape[1], dtype=torch.bool)
            in_index[pool_t] = True
            s = s.clone()
            for r, lab in enumerate(labels):
                keep = in_index.clone()
                keep[torch.from_numpy(lab)] = True
                s[r, ~keep] = -torch.inf
        ranks += label_ranks(s, labels)
        top = torch.topk(s, min(50, s.shape[1]), dim=1).indices.numpy()
        tops10.append(top[:, :k])
        tops50.append(top)
    out: dict = {}
    if protocol == "leave-one-out":
        per = {f"HR@{k}": hit_rate_at_k(ranks, k), f"NDCG@{k}": ndcg_at_k(ranks, k)}
    else:
        per = {f"Recall@{k}": recall_at_k(ranks, k)}
        if interests is not None:
            per["InterestEntropy@50"] = interest_entropy(np.concatenate(tops50), interests)
    for name, v in per.items():
        lo, hi = bootstrap_ci(v)
        out[name] = {"mean": float(np.nanmean(v)), "ci95": [lo, hi]}
    index_size = len(pool) if pool is not None else s.shape[1]
    out[f"P90Coverage@{k}"] = {"mean": p90_coverage(np.concatenate(tops10), index_size), "ci95": None}
    return out


def evaluate_run(run_dir: Path, ds: Dataset, protocol: str | None = None, split: str = "test",
                 cutoffs: list[int] | None = None, label_days: float = 14.0, k: int = 10,
                 index_size: int | None = None, checkpoint: str = "best", seed: int = 0,
                 frequencies: list[str] | None = None, log=print) -> dict:
    t0 = time.perf_counter()
    model, desc = load_run(run_dir, ds, checkpoint)
    protocol = protocol or desc["protocol"]
    m = ds.manifest
    if protocol == "future-window":
        if m.clock == "order":
            raise PinnerformerError(f"{ds.path} is order-only: the future-window protocol needs real timestamps "
                                    "(use --protocol leave-one-out)")
        users = held_out_users(run_dir, split)
        if cutoffs is None:
            t, n = default_cutoff(ds, users, label_days)
            cutoffs = [t]
            log(f"default cut-off {dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%d}: {n} of {len(users)} "
                f"{split} users eligible (the day that makes the most users eligible)")
        task = future_window_eval_task(ds, users, cutoffs, label_days)
        if len(task) == 0:
            raise PinnerformerError(f"no {split} user is eligible at the cut-off(s): nobody has an action before and "
                                    f"a positive within {label_days:g} days after; choose another --cutoff")
    else:
        task = leave_one_out_task(ds, split if split == "test" else "validation")
    from pinnerformer.training.trainer import embed_items, embed_users

    dev = torch.device("cpu")
    scorers = [Scorer("pinnerformer", embed_users(model, ds, task.starts, task.ends, dev), embed_items(model, dev)),
               Scorer("most-popular", None, None, fixed=popularity_scores(ds, task, protocol))]
    cu = content_user_vectors(ds, task)
    if cu is not None:
        scorers.append(Scorer("content (mean of last 20 item vectors)", cu, torch.from_numpy(ds.content_vectors())))
    interests = ds.items.sort("item")["interests"].to_list()
    has_interests = any(len(x) for x in interests)
    pool = None
    if index_size is not None and index_size < m.n_items:
        pool = np.sort(np.random.default_rng(seed).choice(m.n_items, index_size, replace=False))
    results = {s.name: score_task(s, task, k, interests if has_interests else None, pool, protocol) for s in scorers}
    freq_report = None
    if frequencies:
        bad = [f for f in frequencies if f not in FREQUENCIES]
        if bad or protocol != "future-window" or pool is not None:
            raise PinnerformerError("--frequency takes once, daily and/or realtime, with the future-window protocol "
                                    "and the whole catalogue as index" + (f" (got {', '.join(bad)})" if bad else ""))
        items = scorers[0].items
        freq_report = {}
        for f in frequencies:
            v = frequency_recall(model, ds, task, items, f, label_days, k)
            lo, hi = bootstrap_ci(v)
            freq_report[f] = {f"Recall@{k}": {"mean": float(np.nanmean(v)), "ci95": [lo, hi]}}
        if "realtime" in freq_report and "daily" in freq_report:
            rt, dl = freq_report["realtime"][f"Recall@{k}"]["mean"], freq_report["daily"][f"Recall@{k}"]["mean"]
            freq_report["realtime_to_daily_drop"] = (dl - rt) / rt if rt else None
    report = {
        "run": str(Path(run_dir).resolve()), "dataset": str(ds.path.resolve()), "fingerprint": m.fingerprint,
        "protocol": protocol, "split": split, "k": k, "checkpoint": checkpoint,
        "index": f"random pool of {index_size} items (seed {seed}) + the labels" if pool is not None
        else f"whole catalogue ({m.n_items} items)",
        "cutoffs": None if protocol != "future-window" else
        [f"{dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%d}" for t in cutoffs],
        "label_days": label_days if protocol == "future-window" else None,
        "user_windows": len(task), "results": results, "inference_frequency": freq_report,
        "wall_s": round(time.perf_counter() - t0, 1),
        "ties": "pessimistic", "history_excluded": False,
    }
    return report


def write_report(report: dict, run_dir: Path) -> tuple[Path, Path]:
    folder = Path(run_dir) / "eval"
    folder.mkdir(exist_ok=True)
    stem = f"{report['protocol']}-{report['split']}"
    js, md = folder / f"{stem}.json", folder / f"{stem}.md"
    for path, text in ((js, json.dumps(report, indent=2) + "\n"), (md, markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return js, md


def markdown(report: dict) -> str:
    metrics = list(next(iter(report["results"].values())).keys())
    lines = [f"# Evaluation: {report['protocol']} ({report['split']} users)", "",
             f"- run: `{report['run']}` (checkpoint {report['checkpoint']})",
             f"- dataset fingerprint: `{report['fingerprint']}`",
             f"- index: {report['index']}; ties {report['ties']}; history excluded: {report['history_excluded']}"]
    if report["cutoffs"]:
        lines.append(f"- cut-off(s): {', '.join(report['cutoffs'])}; labels: positives in the "
                     f"{report['label_days']:g} days after")
    lines += [f"- user-windows evaluated: {report['user_windows']}", "",
              "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, r in report["results"].items():
        cells = []
        for mname in metrics:
            v = r[mname]
            cells.append(f"{v['mean']:.4f}" + (f" [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" if v["ci95"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("inference_frequency"):
        fr = report["inference_frequency"]
        lines += ["", "Inference frequency (pinnerformer; the embedding in use at each label's time):", "",
                  "| frequency | Recall@" + str(report["k"]) + " |", "|---|---|"]
        for f, r in fr.items():
            if f != "realtime_to_daily_drop":
                v = next(iter(r.values()))
                lines.append(f"| {f} | {v['mean']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] |")
        if fr.get("realtime_to_daily_drop") is not None:
            lines += ["", f"Realtime → daily: {fr['realtime_to_daily_drop']:+.1%}"]
    lines.append("")
    lines.append("Intervals: 95% bootstrap over user-windows (1,000 resamples, seed 0).")
    return "\n".join(lines) + "\n"
