"""The evaluation report: a typed record of what was scored how, and its Markdown rendering."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from pinnerformer.config import StrictModel
from pinnerformer.evaluation.blend import BlendChoice
from pinnerformer.evaluation.scorer import MetricValue
from pinnerformer.io import write_json_atomic, write_text_atomic


MODEL = "pinnerformer"  # the evaluated model's key in EvaluationReport.results (the others are baselines)


class InferenceFrequency(StrictModel):
    metric: str  # e.g. recall@10
    results: dict[str, MetricValue]  # once | daily | realtime -> the model's metric
    realtime_to_daily_drop: float | None  # (daily - realtime) / realtime


def users_sha256(users) -> str:
    import hashlib

    import numpy as np

    return hashlib.sha256(np.unique(np.asarray(users, dtype=np.int64)).tobytes()).hexdigest()


class EvaluationReport(StrictModel):
    run: str
    dataset: str
    fingerprint: str
    protocol: str
    split: str
    k: int
    checkpoint: str
    index: str  # what each label was ranked against
    cutoffs: list[str] | None  # future-window cut-off days
    per_user_cutoffs: bool = False  # future-window: each user at a cut-off of their own (cutoffs is None)
    warnings: list[str] = []
    label_days: float | None
    user_windows: int
    distinct_users: int = 0
    users_sha256: str = ""  # of the sorted distinct dataset user indices scored: which users a number is about
    results: dict[str, dict[str, MetricValue]]  # scorer (model, then baselines) -> metric -> value
    inference_frequency: InferenceFrequency | None = None
    wall_s: float
    ties: str = "pessimistic"
    history_excluded: bool = False
    labels_in_history: int | None = None  # with history excluded: labels that were history items (misses)
    # the model scored is the network blended with item-to-item neighbours at this λ (None: the network alone)
    blend: BlendChoice | None = None
    created_at: str = ""

    @property
    def model(self) -> dict[str, MetricValue]:
        return self.results[MODEL]

    @property
    def baselines(self) -> dict[str, dict[str, MetricValue]]:
        return {name: r for name, r in self.results.items() if name != MODEL}


def _cell(v: MetricValue) -> str:
    return f"{v.mean:.4f}" + (f" [{v.ci95[0]:.4f}, {v.ci95[1]:.4f}]" if v.ci95 else "")


def history_text(report: EvaluationReport) -> str:
    if not report.history_excluded:
        return "history excluded: no (items the user already had stay in the ranking)"
    return (f"history excluded: yes (each user's input items are removed from the ranking; "
            f"{report.labels_in_history} label(s) were history items and count as misses)")


def blend_text(choice: BlendChoice) -> str:
    curve = ", ".join(f"{w} {v:.4f}" for w, v in choice.validation.items())
    by = "" if choice.chosen_by is None else (
        f" by `{choice.chosen_by}`, the run this refit repeats, and carried over as its epoch count is (the "
        "neighbours fit on the refit's training part: every timeline but its last action)")
    return (f"the model is the network blended with item-to-item neighbours (`evaluation.blend`): λ = "
            f"{choice.weight:g}, chosen on validation {choice.metric}{by} "
            f"(history {'removed' if choice.history_excluded else 'in'}; by λ: {curve})")


def markdown(report: EvaluationReport) -> str:
    metrics = list(next(iter(report.results.values())).keys())
    lines = [f"# Evaluation: {report.protocol} ({report.split} users)", "",
             f"- run: `{report.run}` (checkpoint {report.checkpoint})",
             f"- dataset fingerprint: `{report.fingerprint}`",
             f"- index: {report.index}; ties {report.ties}; {history_text(report)}"]
    if report.cutoffs:
        lines.append(f"- cut-off(s): {', '.join(report.cutoffs)}; labels: positives in the "
                     f"{report.label_days:g} days after")
    if report.per_user_cutoffs:
        lines.append(f"- cut-offs: one per user (seeded, among the times that make the user eligible); labels: "
                     f"positives in the {report.label_days:g} days after")
    if report.blend is not None:
        lines.append(f"- {blend_text(report.blend)}")
    lines += [f"- **warning**: {w}" for w in report.warnings]
    lines += [f"- user-windows evaluated: {report.user_windows}", "",
              "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, r in report.results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r[m]) for m in metrics) + " |")
    fr = report.inference_frequency
    if fr is not None:
        lines += ["", "Inference frequency (pinnerformer; the embedding in use at each label's time):", "",
                  f"| frequency | {fr.metric} |", "|---|---|"]
        lines += [f"| {f} | {_cell(v)} |" for f, v in fr.results.items()]
        if fr.realtime_to_daily_drop is not None:
            lines += ["", f"Realtime → daily: {fr.realtime_to_daily_drop:+.1%}"]
    lines += ["", "Intervals: 95% bootstrap over user-windows (1,000 resamples, seed 0)."]
    return "\n".join(lines) + "\n"


def write_report(report: EvaluationReport, folder: Path) -> tuple[Path, Path]:
    """FOLDER/PROTOCOL-SPLIT.json and .md, each written atomically; an earlier report of that name is kept, moved to
    FOLDER/archive/ under its creation time (nothing is overwritten)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{report.protocol}-{report.split}" + ("-history-excluded" if report.history_excluded else "")
    js, md = folder / f"{stem}.json", folder / f"{stem}.md"
    if js.exists():
        try:
            stamp = json.loads(js.read_text()).get("created_at") or ""
        except ValueError:
            stamp = ""
        stamp = (stamp or dt.datetime.fromtimestamp(js.stat().st_mtime, dt.timezone.utc).isoformat(
            timespec="seconds")).replace(":", "")
        (folder / "archive").mkdir(exist_ok=True)
        for old in (js, md):
            if old.exists():
                os.replace(old, folder / "archive" / f"{old.stem}.{stamp}{old.suffix}")
    write_json_atomic(js, report)
    write_text_atomic(md, markdown(report))
    return js, md
