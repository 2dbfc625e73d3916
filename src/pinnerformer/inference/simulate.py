"""`pinnerformer simulate-daily`: the daily job replayed over the dataset's own timeline, as production runs it.

For every day D from `--from` to `--to`: the incremental job writes snapshot D (from snapshot D-1), then the
snapshot that production would serve after that run is scored with the future-window protocol at the cut-off
t = end of day D: the run's held-out *test* users with an action before t and a positive action in
[t, t + label_days) get Recall@k (each label against the whole catalogue minus the user's other labels, exact
search). Beside it, the same windows scored with the snapshot of the first day, never refreshed: the gap
between the two curves is what staleness costs, day by day.

Writes OUTPUT/snapshots/DAY/ (the snapshots), OUTPUT/staleness.json, OUTPUT/staleness.md, OUTPUT/staleness.png.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import write_json_atomic
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.evaluate import eligible_windows
from pinnerformer.evaluation.metrics import bootstrap_ci, label_ranks, recall_at_k
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import Snapshot, day_end_ts
from pinnerformer.progress import progress_bar


def test_users(run_dir: Path) -> np.ndarray:
    path = Path(run_dir) / "split.parquet"
    if not path.exists():
        raise PinnerformerError(f"{run_dir} has no user split (trained with leave-one-out?): simulate-daily scores "
                                "held-out test users, so it needs a future-window run")
    return np.flatnonzero((pl.read_parquet(path)["split"] == "test").to_numpy())


def snapshot_recall(snap: Snapshot, items: torch.Tensor, users: np.ndarray, labels: list[np.ndarray],
                    k: int) -> np.ndarray:
    """Per user: Recall@k of the snapshot's vector (users must be in the snapshot)."""
    row = {int(u): i for i, u in enumerate(snap.users)}
    vecs = torch.from_numpy(snap.vectors[[row[int(u)] for u in users]].astype(np.float32))
    return recall_at_k(label_ranks(vecs @ items.T, labels), k)


def simulate_daily(run_dir: Path, ds: Dataset, first: dt.date, last: dt.date, output: Path, k: int = 10,
                   label_days: float = 14.0, dtype: str = "float32", log=print, progress: bool = True,
                   command: str = "") -> dict:
    from pinnerformer.evaluation.evaluate import load_run
    from pinnerformer.training.trainer import embed_items

    if last < first:
        raise PinnerformerError(f"--to {last} is before --from {first}")
    if day_end_ts(last) > ds.manifest.time_max + int(label_days * 86400):
        log(f"note: label windows after {dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc):%Y-%m-%d} "
            "run past the end of the data; later days have fewer eligible users")
    t0 = time.perf_counter()
    output = Path(output)
    model, _ = load_run(run_dir, ds)
    items = embed_items(model, torch.device("cpu"))
    users = test_users(run_dir)
    root = output / "snapshots"
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    rows, pooled_daily, pooled_frozen = [], [], []
    frozen: Snapshot | None = None
    bar = progress_bar(total=len(days), unit="day", desc="simulate-daily", disable=not progress)
    for day in days:
        job = DailyJob(run_dir, ds, day, root, dtype=dtype)
        m = job.run(log=lambda s: None, progress=False)
        snap = Snapshot.open(job.final)
        frozen = frozen or snap
        t = day_end_ts(day)
        windows = eligible_windows(ds, users, t, label_days)
        elig = [(int(u), w[1]) for u, w in zip(users, windows) if w is not None]
        in_frozen = set(frozen.users.tolist())
        both = [(u, lab) for u, lab in elig if u in in_frozen]
        r_daily = snapshot_recall(snap, items, np.array([u for u, _ in elig]), [lab for _, lab in elig], k) \
            if elig else np.zeros(0)
        r_frozen = snapshot_recall(frozen, items, np.array([u for u, _ in both]), [lab for _, lab in both], k) \
            if both else np.zeros(0)
        # The paired comparison: daily vs frozen on the users both snapshots have.
        r_daily_both = snapshot_recall(snap, items, np.array([u for u, _ in both]), [lab for _, lab in both], k) \
            if both else np.zeros(0)
        pooled_daily.append(r_daily_both)
        pooled_frozen.append(r_frozen)
        rows.append({"day": day.isoformat(), "recomputed": m["recomputed"], "carried_over": m["carried_over"],
                     "users_in_snapshot": m["users"], "eligible_test_users": len(elig),
                     f"recall@{k}_daily": float(np.mean(r_daily)) if len(r_daily) else None,
                     "eligible_in_first_snapshot": len(both),
                     f"recall@{k}_daily_same_users": float(np.mean(r_daily_both)) if len(both) else None,
                     f"recall@{k}_frozen": float(np.mean(r_frozen)) if len(both) else None,
                     "frozen_age_days": (day - first).days})
        bar.update(1)
    bar.close()
    pd_, pf_ = np.concatenate(pooled_daily), np.concatenate(pooled_frozen)
    result = {
        "run": str(Path(run_dir).resolve()), "dataset": str(Path(ds.path).resolve()),
        "fingerprint": ds.manifest.fingerprint, "from": first.isoformat(), "to": last.isoformat(), "k": k,
        "label_days": label_days, "test_users": int(len(users)), "days": rows,
        "pooled": {"user_windows": int(len(pd_)),
                   f"recall@{k}_daily": float(pd_.mean()) if len(pd_) else None,
                   f"recall@{k}_daily_ci95": bootstrap_ci(pd_),
                   f"recall@{k}_frozen": float(pf_.mean()) if len(pf_) else None,
                   f"recall@{k}_frozen_ci95": bootstrap_ci(pf_)},
        "command": command, "wall_s": round(time.perf_counter() - t0, 1),
        "protocol": (f"future-window at each day's end: the run's held-out test users with an action before the "
                     f"cut-off and a positive in the next {label_days:g} days; Recall@{k} against all "
                     f"{ds.manifest.n_items:,} items (exact search), each label against the catalogue minus the "
                     "user's other labels"),
    }
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "staleness.json", result)
    (output / "staleness.md").write_text(markdown(result))
    plot(result, output / "staleness.png")
    log(f"wrote {output}/staleness.md, .json and .png ({result['wall_s']} s)")
    return result


def markdown(r: dict) -> str:
    k = r["k"]

    def f(v):
        return "–" if v is None else f"{v:.4f}"

    p = r["pooled"]
    lines = [f"# Daily inference, replayed {r['from']} → {r['to']}", "",
             f"- run `{r['run']}`, dataset `{r['dataset']}` (fingerprint {r['fingerprint']})",
             f"- protocol: {r['protocol']}",
             f"- frozen = the {r['from']} snapshot, never refreshed; compared on the users it contains",
             f"- pooled over all days ({p['user_windows']} user-windows): daily Recall@{k} {f(p[f'recall@{k}_daily'])} "
             f"[{p[f'recall@{k}_daily_ci95'][0]:.4f}, {p[f'recall@{k}_daily_ci95'][1]:.4f}] vs frozen "
             f"{f(p[f'recall@{k}_frozen'])} [{p[f'recall@{k}_frozen_ci95'][0]:.4f}, "
             f"{p[f'recall@{k}_frozen_ci95'][1]:.4f}]",
             f"- reproduce: `{r['command']}` ({r['wall_s']} s)", "",
             f"| day | recomputed | carried over | eligible test users | Recall@{k} daily | same users: daily | "
             f"frozen (age, days) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for d in r["days"]:
        lines.append(f"| {d['day']} | {d['recomputed']:,} | {d['carried_over']:,} | {d['eligible_test_users']} | "
                     f"{f(d[f'recall@{k}_daily'])} | {f(d[f'recall@{k}_daily_same_users'])} | "
                     f"{f(d[f'recall@{k}_frozen'])} ({d['frozen_age_days']}) |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = r["k"]
    days = [d["day"] for d in r["days"]]
    x = np.arange(len(days))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for key, label in ((f"recall@{k}_daily_same_users", "refreshed daily"), (f"recall@{k}_frozen", f"frozen at {r['from']}")):
        ax1.plot(x, [np.nan if d[key] is None else d[key] for d in r["days"]], marker="o", ms=3, label=label)
    ax1.set_ylabel(f"Recall@{k} (test users)")
    ax1.legend()
    ax1.set_title("Staleness: a daily snapshot vs one never refreshed")
    ax2.bar(x, [d["recomputed"] for d in r["days"]], color="tab:gray")
    ax2.set_ylabel("users recomputed")
    step = max(1, len(days) // 10)
    ax2.set_xticks(x[::step], days[::step], rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
