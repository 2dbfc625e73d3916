"""`pinnerformer rank evaluate`: trained rankers and the baselines scored on the same requests of one period by the
same code, per head: HIT@3 (with the top-3 diversity), AUC and grouped AUC with 95% bootstrap intervals, and lifts
over a reference (the ranker without sequence features) with paired-bootstrap intervals. The report carries the
protocol, the ranking data's and the dataset's fingerprints and the PinnerFormer checkpoint behind the feature.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch

from pinnerformer.config import StrictModel
from pinnerformer.data.requests import RankData
from pinnerformer.evaluation import ranking_metrics as rm
from pinnerformer.evaluation.ranking import (
    BASELINES, Lift, MetricValue, PerRequest, baseline_scores, score_requests, v2_spec_for,
)
from pinnerformer.io import write_json_atomic, write_text_atomic, portable_path
from pinnerformer.models.gbdt import GbdtRanker
from pinnerformer.ranking.run import RankRun


class RankingReport(StrictModel):
    split: str
    requests: int
    heads: dict[str, str]  # head -> definition ("save=love", "hide=-dislike")
    protocol: str
    data: dict[str, object]  # ranking data: path, fingerprint, dataset fingerprint, PinnerFormer checkpoint, vectors
    models: dict[str, dict[str, MetricValue]]  # model or baseline -> metric key -> value
    reference: str | None
    lifts: dict[str, dict[str, Lift]]  # model -> metric key -> lift over the reference
    created_at: str
    notes: list[str] = []


def protocol_text(rd: RankData, k: int) -> str:
    m = rd.manifest
    day = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).date().isoformat()  # noqa: E731
    n = m.options.max_candidates
    whole = [p for p in ("validation", "test") if p not in m.thinned_periods]
    thinned = (f"{' and '.join(m.thinned_periods) + ' ' if whole else ''}requests over {n} candidates cut to a "
               f"seeded sample of {n}" + (f", {' and '.join(whole)} ones whole" if whole else ""))
    return (f"{m.options.request} requests rebuilt from {m.dataset_format} events (candidates: what the user acted "
            f"on in the request{', real impressions' if m.dataset_format == 'mind' else ''}; {thinned}); time split "
            f"(--split {m.options.split_text}): "
            + (f"PinnerFormer's period < {day(m.feature_end)} <= " if m.feature_end is not None else "")
            + f"ranker's train < {day(m.train_end)} <= validation < {day(m.val_end)} <= test; realtime sequence "
            f"strictly before each request; PinnerFormer vector from the day before (model trained before "
            f"{day(m.pf_until)} only); "
            f"HIT@{k} per head over requests with an engaged candidate (positive heads ranked by their own score, "
            "negative heads counted in the served order, ties pessimistic); AUC; grouped AUC weighted by "
            "candidates; 95% bootstrap over requests")


def evaluate_ranking(rd: RankData, runs: dict[str, Path], split: str = "test", reference: str | None = None,
                     baselines: list[str] = BASELINES, k: int = 3, seed: int = 0, n_boot: int = 1000,
                     interests: bool = False, draws: np.ndarray | None = None, log=print
                     ) -> tuple[RankingReport, dict]:
    """Every run and baseline on the requests of `split` (with `interests`, also the served top 3's diversity);
    returns the report and the per-request values. `draws`: the bootstrap draws to use (a caller that pairs further
    lifts with the report's), else `n_boot` of them from `seed`."""
    requests = rd.requests_in(split)
    ds = rd.dataset()
    interests = ds.items["interests"].to_list() if interests else None
    device = torch.device("cpu")
    scored: dict[str, PerRequest] = {}
    for name in baselines:
        scores = baseline_scores(name, rd, requests, seed)
        if scores is not None:  # (item-value on data without numbers)
            scored[name] = PerRequest(scores, rd, requests, k, seed, interests)
    for name, path in runs.items():
        log(f"scoring {name} ({path}) on {len(requests):,} {split} requests")
        model = RankRun(path).load_model(rd)
        if isinstance(model, GbdtRanker):
            scores = model.score_requests(rd, requests)
        else:
            spec = v2_spec_for(model, rd, ds.manifest.action_names(), ds.manifest.positive_codes)
            scores = score_requests(model, rd, ds.timelines, requests, device, v2=spec)
        scored[name] = PerRequest(scores, rd, requests, k, seed, interests)
    draws = rm.bootstrap_draws(len(requests), n_boot, seed) if draws is None else draws
    auc_draws = draws[:200]
    models = {name: p.with_intervals(draws, auc_draws) for name, p in scored.items()}
    lifts = {}
    if reference is not None:
        lifts = {name: p.lifts(scored[reference], draws) for name, p in scored.items() if name != reference}
    m = rd.manifest
    report = RankingReport(
        split=split, requests=len(requests), heads={h.name: h.text() for h in rd.heads},
        protocol=protocol_text(rd, k),
        data={"path": portable_path(rd.path), "fingerprint": m.fingerprint, "dataset": m.dataset.fingerprint,
              "dataset_format": m.dataset_format, "pinnerformer_checkpoint": m.pinnerformer["checkpoint_sha256"],
              "item_vectors": m.item_vectors["source"], "requests_per_split": {s: c.requests for s, c in
                                                                                m.splits.items()}},
        models=models, reference=reference, lifts=lifts, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        notes=list(m.notes))
    return report, scored


def report_markdown(report: RankingReport, columns: list[str] | None = None) -> str:
    keys = columns or list(next(iter(report.models.values())).keys())
    lines = [f"**{report.split}**, {report.requests:,} requests. {report.protocol}.", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, vals in report.models.items():
        cells = [f"{vals[k].mean:.4f} [{vals[k].ci95[0]:.4f}, {vals[k].ci95[1]:.4f}]" if k in vals else ""
                 for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.reference:
        lines += ["", lift_markdown(report.lifts, report.reference, lift_keys(keys)).rstrip()]
    lines += ["", f"data fingerprint {report.data['fingerprint']} (dataset {report.data['dataset']}); PinnerFormer "
              f"checkpoint {str(report.data['pinnerformer_checkpoint'])[:16]}; item vectors: "
              f"{report.data['item_vectors']}"]
    return "\n".join(lines) + "\n"


def lift_keys(keys) -> list[str]:
    """The metric keys lifts are given for (HIT@k and grouped AUC), in order."""
    return [k for k in keys if k.startswith(rm.HIT) or k.startswith(rm.GAUC)]


def lift_markdown(lifts: dict[str, dict[str, Lift]], reference: str, keys: list[str]) -> str:
    """The paired lifts of each model over `reference`, one row per model, one column per metric key."""
    lines = [f"Lift over `{reference}` (paired bootstrap 95%):", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, vals in lifts.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * vals[k].lift:+.1f}% [{100 * vals[k].ci95[0]:+.1f}, {100 * vals[k].ci95[1]:+.1f}]"
            if k in vals else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: RankingReport, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{name}.json", report)
    write_text_atomic(folder / f"{name}.md", report_markdown(report))
    return folder / f"{name}.md"
