"""`pinnerformer rank experiment`: the papers' ablations on one ranking data directory, in one command.

Every variant is one training run of the same task (same data, seed, budget and selection on validation), scored
on the test period with the baselines by the same code; the tables group the runs:

    table1   TransAct Table 1: no sequence / average pooling / BST-style / TransAct
    table2   TransAct Table 2: full / full - PinnerFormer / full - TransAct
    fusion   early fusion: concat / append / none
    mask     random time-window mask: on / off (with the diversity of the top 3)
    output   output compression: first K + max-pool / max-pool / first K / all positions
    v2-table2    TransAct V2 Table 2: realtime only / + next-action loss (in-batch negatives) / + next-action loss
                 (impression negatives; the impressions also in S) / + lifelong (V2 full)
    v2-lifelong  V2 with the lifelong sequence cut to 0 / 256 / 1,024 / all (16,384) actions
    v2-nal       V2 with the next-action loss's weight 0.001 / 0.01 (default) / 0.1

Beside every table, what a practitioner would use instead, on the same requests by the same code: the baselines
(random, popularity, the item's rate and mean value, the PinnerFormer score) and gradient-boosted trees on the same
point-in-time features (`gbdt`, trained once with the same seed and validation period).

Written to OUTPUT: runs/<variant>/ (each a run directory), report.json + README.md (every table, with intervals,
lifts over the ranker without sequence features and over the trees, protocol and fingerprints) and one PNG per
table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pinnerformer.config import merge_dicts
from pinnerformer.data.requests import RankData
from pinnerformer.evaluation import ranking_metrics as rm
from pinnerformer.evaluation.ranking import BASELINES
from pinnerformer.io import write_json_atomic, write_text_atomic
from pinnerformer.ranking.evaluate import (
    evaluate_ranking, lift_keys, lift_markdown, report_markdown, write_report,
)
from pinnerformer.training import run_files as rf
from pinnerformer.training.gbdt import train_gbdt
from pinnerformer.training.ranking import load_rank_config, ranking_loop

REFERENCE = "no-sequence"
TREES = "gbdt"
N_BOOT = 1000  # bootstrap draws over test requests
VARIANTS: dict[str, dict] = {
    TREES: {"learner": "gbdt"},
    "no-sequence": {"model": {"sequence": "none"}},
    "average": {"model": {"sequence": "average"}},
    "bst": {"model": {"sequence": "bst"}},
    "transact": {},
    "no-pinnerformer": {"model": {"use_pinnerformer": False}},
    "fusion-append": {"model": {"transact": {"fusion": "append"}}},
    "fusion-none": {"model": {"transact": {"fusion": "none"}}},
    "no-time-mask": {"model": {"transact": {"time_window_hours": 0.0}}},
    "output-max": {"model": {"transact": {"output": "max"}}},
    "output-first-k": {"model": {"transact": {"output": "first-k"}}},
    "output-all": {"model": {"transact": {"output": "all"}}},
    # TransAct V2 (the next-action loss's default weight 0.01; "full": every part at its default)
    "v2-realtime": {"model": {"sequence": "transact-v2", "v2": {"lifelong_max": 0, "k_lifelong": 0,
                                                                 "k_impressions": 0}},
                    "loss": {"next_action": {"weight": 0.0}}},
    "v2-nal-in-batch": {"model": {"sequence": "transact-v2", "v2": {"lifelong_max": 0, "k_lifelong": 0,
                                                                     "k_impressions": 0}},
                        "loss": {"next_action": {"negatives": "in-batch"}}},
    "v2-nal-impressions": {"model": {"sequence": "transact-v2", "v2": {"lifelong_max": 0, "k_lifelong": 0}}},
    "v2-full": {"model": {"sequence": "transact-v2"}},
    "v2-lifelong-256": {"model": {"sequence": "transact-v2", "v2": {"lifelong_max": 256}}},
    "v2-lifelong-1k": {"model": {"sequence": "transact-v2", "v2": {"lifelong_max": 1024}}},
    "v2-nal-0.001": {"model": {"sequence": "transact-v2"}, "loss": {"next_action": {"weight": 0.001}}},
    "v2-nal-0.1": {"model": {"sequence": "transact-v2"}, "loss": {"next_action": {"weight": 0.1}}},
}
TABLES: dict[str, list[tuple[str, str]]] = {  # table -> (row label, variant)
    "table1": [("no sequence", "no-sequence"), ("average pooling", "average"), ("BST-style", "bst"),
               ("TransAct", "transact")],
    "table2": [("full", "transact"), ("full - PinnerFormer", "no-pinnerformer"), ("full - TransAct", "no-sequence")],
    "fusion": [("concat", "transact"), ("append", "fusion-append"), ("none", "fusion-none")],
    "mask": [("time-window mask on", "transact"), ("mask off", "no-time-mask")],
    "output": [("first K + max-pool", "transact"), ("max-pool", "output-max"), ("first K", "output-first-k"),
               ("all positions", "output-all")],
    "v2-table2": [("TransAct (realtime)", "v2-realtime"), ("+ NAL, in-batch negatives", "v2-nal-in-batch"),
                  ("+ NAL, impression negatives", "v2-nal-impressions"), ("+ lifelong (V2 full)", "v2-full")],
    "v2-lifelong": [("lifelong 0", "v2-nal-impressions"), ("lifelong 256", "v2-lifelong-256"),
                    ("lifelong 1,024", "v2-lifelong-1k"), ("lifelong all (16,384)", "v2-full")],
    "v2-nal": [("NAL weight 0.001", "v2-nal-0.001"), ("NAL weight 0.01", "v2-full"), ("NAL weight 0.1", "v2-nal-0.1")],
}

DEFAULT_TABLES = ["table1", "table2", "fusion", "mask", "output"]  # TransAct's; the V2 tables when asked for


def run_experiment(rank_dir: Path, output: Path, preset: str = "fast", tables: list[str] | None = None,
                   max_steps: int | None = None, seed: int = 0, overrides: dict | None = None, command: str = "",
                   log=print) -> Path:
    rd = RankData(rank_dir)
    tables = tables or DEFAULT_TABLES
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        from pinnerformer.errors import PinnerformerError
        raise PinnerformerError(f"unknown table(s) {', '.join(unknown)} (expected: {', '.join(TABLES)})")
    variants = list(dict.fromkeys([REFERENCE, TREES] + [v for t in tables for _, v in TABLES[t]]))
    runs = {}
    for i, name in enumerate(variants):
        run_dir = output / "runs" / name
        cfg = load_rank_config(preset, overrides=merge_dicts(merge_dicts({"seed": seed}, overrides or {}),
                                                             VARIANTS[name]))
        if (run_dir / rf.SUMMARY).exists():
            log(f"[{i + 1}/{len(variants)}] {name}: already trained ({run_dir})")
        elif cfg.learner == "gbdt":  # one go: a half-written folder from a killed run is started again
            log(f"[{i + 1}/{len(variants)}] training {name} -> {run_dir}")
            if run_dir.exists():
                shutil.rmtree(run_dir)
            train_gbdt(rd, cfg, run_dir, log=log)
        else:
            log(f"[{i + 1}/{len(variants)}] training {name} -> {run_dir}")
            ranking_loop(rd, cfg, run_dir, log=log).fit(resume=(run_dir / rf.CONFIG).exists(), max_steps=max_steps,
                                                        progress=True)
        runs[name] = run_dir
    draws = rm.bootstrap_draws(len(rd.requests_in("test")), N_BOOT, seed)  # the report's, and the trees' lifts
    report, scored = evaluate_ranking(rd, runs, "test", reference=REFERENCE, interests=True, seed=seed,
                                      draws=draws, log=log)
    over_trees = {name: p.lifts(scored[TREES], draws) for name, p in scored.items() if name != TREES}
    keys = lift_keys(next(iter(report.models.values())))
    write_report(report, output, "report")
    write_json_atomic(output / "lifts_over_trees.json",
                      {name: {k: v.model_dump() for k, v in lifts.items()} for name, lifts in over_trees.items()})
    sections = [f"# Ranking ablations on `{rank_dir}`", "", f"Reproduce: `{command}`" if command else "",
                f"Preset `{preset}`" + (f" with overrides `{json.dumps(overrides)}`" if overrides else "")
                + f", seed {seed}" + (f", at most {max_steps} steps per run" if max_steps else "")
                + "; every variant selected on the validation period, scored on the test period.", ""]
    for t in tables:
        rows = TABLES[t] + [("gbdt (trees, same features)", TREES)]
        sub = report.model_copy(update={
            "models": {label: report.models[v] for label, v in rows},
            "lifts": {label: report.lifts[v] for label, v in rows if v in report.lifts}})
        sections += [f"## {t}", "", report_markdown(sub),
                     lift_markdown({label: over_trees[v] for label, v in TABLES[t]}, TREES, keys),
                     f"![{t}]({t}.png)", ""]
        plot_table(sub, output / f"{t}.png", f"{t} ({rank_dir.name}, test)",
                   {"random order": report.models["random"], "gbdt": report.models[TREES]})
    base = report.model_copy(update={"models": {b: report.models[b] for b in BASELINES + [TREES]
                                                if b in report.models}, "lifts": {}, "reference": None})
    sections += ["## baselines (same requests, same code)", "", report_markdown(base),
                 lift_markdown({b: over_trees[b] for b in BASELINES if b in over_trees}, TREES, keys)]
    write_text_atomic(output / "README.md", "\n".join(sections))
    return output / "README.md"


def plot_table(report, path: Path, title: str, lines: dict[str, dict] | None = None) -> None:
    """One bar per row and metric with its interval; `lines`: reference models drawn across each panel (the random
    order: what a ranker that learned nothing gets; the trees: what it has to beat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in next(iter(report.models.values())) if k.startswith(rm.HIT)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names = list(report.models)
        means = [report.models[n][key].mean for n in names]
        lo = [m - report.models[n][key].ci95[0] for n, m in zip(names, means)]
        hi = [report.models[n][key].ci95[1] - m for n, m in zip(names, means)]
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=3, color="#4477aa")
        for (label, ref), colour in zip((lines or {}).items(), ("#aa3377", "#228833", "#ccbb44")):
            ax.axhline(ref[key].mean, color=colour, linestyle="--", linewidth=1, label=label)
        if lines:
            ax.legend(fontsize=6, loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(key + (" (lower is better)" if any(h for h, d in report.heads.items()
                                                       if key.endswith("/" + h) and "=-" in d) else ""), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


