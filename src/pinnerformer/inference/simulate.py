"""`pinnerformer simulate-daily`: the daily job replayed over the dataset's own timeline, as production runs it.

For every day D from `--from` to `--to`: the incremental job writes snapshot D (from snapshot D-1), then the
snapshot that production would serve after that run is scored with the future-window protocol at the cut-off
t = end of day D: the run's held-out *test* users with an action before t and a positive action in
[t, t + label_days) get Recall@k (each label against the whole catalogue minus the user's other labels, exact
search). Beside it, the same windows scored with the snapshot a slower cadence would be serving — the job run
only every 7 days, or never after the first day — on the users that snapshot contains, paired with the daily
snapshot on the same users: the gap is what staleness costs, day by day.

Writes the snapshots to OUTPUT/snapshots/DAY/ (or --snapshots), OUTPUT/staleness.json, OUTPUT/staleness.md, OUTPUT/staleness.png.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch

from pinnerformer.data.clock import day_end_ts
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.metrics import RECALL, bootstrap_ci, label_ranks, metric_name, recall_at_k
from pinnerformer.evaluation.tasks import eligible_windows
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import Snapshot
from pinnerformer.io import atomic_path, write_json_atomic, write_text_atomic, portable_path
from pinnerformer.models.embedding import embed_items
from pinnerformer.progress import progress_bar
from pinnerformer.runs.run_dir import RunDir


CADENCES = {"daily": 1, "weekly": 7, "frozen": 0}  # 0: never refreshed after the first day


def snapshot_recall(snap: Snapshot, items: torch.Tensor, users: np.ndarray, labels: list[np.ndarray],
                    k: int) -> np.ndarray:
    """Per user: Recall@k of the snapshot's vector (users must be in the snapshot)."""
    vecs = torch.from_numpy(snap.vectors[[snap.row_of_user[int(u)] for u in users]].astype(np.float32))
    return recall_at_k(label_ranks(vecs @ items.T, labels), k)


def simulate_daily(run_dir: Path, ds: Dataset, first: dt.date, last: dt.date, output: Path, k: int = 10,
                   label_days: float = 14.0, dtype: str = "float32", log=print, progress: bool = True,
                   command: str = "", snapshots: Path | None = None) -> dict:
    rk = metric_name(RECALL, k)
    if last < first:
        raise PinnerformerError(f"--to {last} is before --from {first}")
    if day_end_ts(last) > ds.manifest.time_max + int(label_days * 86400):
        log(f"note: label windows after {dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc):%Y-%m-%d} "
            "run past the end of the data; later days have fewer eligible users")
    t0 = time.perf_counter()
    output = Path(output)
    run = RunDir(run_dir)
    items = embed_items(run.load_model(ds), torch.device("cpu"))
    users = run.held_out_users("test")
    root = Path(snapshots) if snapshots else output / "snapshots"
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    rows = []
    pooled: dict[str, tuple[list, list]] = {c: ([], []) for c in CADENCES if c != "daily"}
    snaps: dict[str, Snapshot] = {}
    bar = progress_bar(total=len(days), unit="day", desc="simulate-daily", disable=not progress)
    for day in days:
        job = DailyJob(run_dir, ds, day, root, dtype=dtype)
        m = job.run(log=lambda s: None, progress=False)
        snaps[day.isoformat()] = snap = Snapshot.open(job.final)
        t = day_end_ts(day)
        windows = eligible_windows(ds, users, t, label_days)
        elig = [(int(u), w[1]) for u, w in zip(users, windows) if w is not None]
        r_daily = snapshot_recall(snap, items, np.array([u for u, _ in elig]), [lab for _, lab in elig], k) \
            if elig else np.zeros(0)
        row = {"day": day.isoformat(), "recomputed": m.recomputed, "carried_over": m.carried_over,
               "users_in_snapshot": m.users, "eligible_test_users": len(elig),
               f"{rk}_daily": float(np.mean(r_daily)) if len(r_daily) else None}
        age = (day - first).days
        for cadence, every in CADENCES.items():
            if cadence == "daily":
                continue
            # the snapshot in use when the job runs only every `every` days (frozen: only on the first day)
            used = snaps[(first + dt.timedelta(days=age - age % every if every else 0)).isoformat()]
            have = used.row_of_user
            pair = [(u, lab) for u, lab in elig if u in have]  # compared on the users that snapshot has
            pu, pl_ = np.array([u for u, _ in pair]), [lab for _, lab in pair]
            r_used = snapshot_recall(used, items, pu, pl_, k) if pair else np.zeros(0)
            r_fresh = snapshot_recall(snap, items, pu, pl_, k) if pair else np.zeros(0)
            now = snap.row_of_user
            stale = sum(bool((snap.vectors[now[u]] != used.vectors[have[u]]).any()) for u, _ in pair)
            pooled[cadence][0].append(r_fresh)
            pooled[cadence][1].append(r_used)
            row[cadence] = {"users": len(pair), "stale_vectors": int(stale), "age_days": (day - used.day).days,
                            rk: float(r_used.mean()) if pair else None,
                            f"{rk}_daily_same_users": float(r_fresh.mean()) if pair else None}
        rows.append(row)
        bar.update(1)
    bar.close()
    summary = {}
    ci = lambda v: list(bootstrap_ci(v)) if len(v) else None  # noqa: E731  (no windows: no interval, never NaN)
    for cadence, (fresh, used) in pooled.items():
        f_, u_ = np.concatenate(fresh), np.concatenate(used)
        summary[cadence] = {"user_windows": int(len(f_)), f"{rk}_daily": float(f_.mean()) if len(f_) else None,
                            f"{rk}_daily_ci95": ci(f_), rk: float(u_.mean()) if len(u_) else None,
                            f"{rk}_ci95": ci(u_), "drop_ci95": ci(f_ - u_)}
    n_windows = sum(r["eligible_test_users"] for r in rows)
    warnings = [] if n_windows >= 30 else [
        f"only {n_windows} test user-window(s) in {first} → {last} (held-out test users with an action before a "
        f"day's end and a positive in the {label_days:g} days after): too few to read anything from; pick days "
        "where the held-out users are active"]
    for w in warnings:
        log("warning: " + w)
    result = {
        "run": portable_path(run_dir), "dataset": portable_path(ds.path),
        "fingerprint": ds.manifest.fingerprint, "from": first.isoformat(), "to": last.isoformat(), "k": k,
        "label_days": label_days, "test_users": int(len(users)), "days": rows,
        "daily_user_windows": n_windows, "pooled": summary, "warnings": warnings,
        "command": command, "wall_s": round(time.perf_counter() - t0, 1),
        "protocol": (f"future-window at each day's end: the run's held-out test users with an action before the "
                     f"cut-off and a positive in the next {label_days:g} days; {rk} against all "
                     f"{ds.manifest.n_items:,} items (exact search), each label against the catalogue minus the "
                     "user's other labels"),
    }
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "staleness.json", result)
    write_text_atomic(output / "staleness.md", markdown(result))
    plot(result, output / "staleness.png")
    log(f"wrote {output}/staleness.md, .json and .png ({result['wall_s']} s)")
    return result


def markdown(r: dict) -> str:
    rk = metric_name(RECALL, r["k"])

    def f(v):
        return "–" if v is None else f"{v:.4f}"

    def interval(v, sign: str = ""):
        return "[–]" if v is None else f"[{v[0]:{sign}.4f}, {v[1]:{sign}.4f}]"

    lines = [f"# Daily inference, replayed {r['from']} → {r['to']}", "",
             f"- run `{r['run']}`, dataset `{r['dataset']}` (fingerprint {r['fingerprint']})",
             f"- protocol: {r['protocol']}",
             "- daily: the snapshot of that very day; weekly: the job run only every 7 days from the first day; "
             "frozen: the first day's snapshot, never refreshed. Each is compared with the daily snapshot on the "
             "eligible users it contains (paired); stale = how many of those have a different vector today"]
    lines += [f"- **warning**: {w}" for w in r.get("warnings", [])]
    for cadence, p in r["pooled"].items():
        lines.append(f"- pooled, {cadence} vs daily ({p['user_windows']} user-windows): {rk} "
                     f"{f(p[rk])} {interval(p[f'{rk}_ci95'])} vs {f(p[f'{rk}_daily'])} "
                     f"{interval(p[f'{rk}_daily_ci95'])}; daily − {cadence} 95% CI {interval(p['drop_ci95'], '+')}")
    lines += [f"- reproduce: `{r['command']}` ({r['wall_s']} s)", "",
              f"| day | recomputed | carried over | eligible | {rk} daily | weekly: users (stale) | weekly | "
              f"daily, same users | frozen: users (stale) | frozen | daily, same users |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in r["days"]:
        w, z = d["weekly"], d["frozen"]
        lines.append(f"| {d['day']} | {d['recomputed']:,} | {d['carried_over']:,} | {d['eligible_test_users']} | "
                     f"{f(d[f'{rk}_daily'])} | {w['users']} ({w['stale_vectors']}) | {f(w[rk])} | "
                     f"{f(w[f'{rk}_daily_same_users'])} | {z['users']} ({z['stale_vectors']}) | "
                     f"{f(z[rk])} | {f(z[f'{rk}_daily_same_users'])} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rk = metric_name(RECALL, r["k"])
    days = [d["day"] for d in r["days"]]
    x = np.arange(len(days))
    val = lambda v: np.nan if v is None else v  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot(x, [val(d[f"{rk}_daily"]) for d in r["days"]], marker="o", ms=3, color="black",
             label="daily snapshot (all eligible test users)")
    for cadence, color in (("weekly", "tab:blue"), ("frozen", "tab:orange")):
        ax1.plot(x, [val(d[cadence][rk]) for d in r["days"]], marker=".", ms=3, color=color,
                 label=f"{cadence} (its users)")
        ax1.plot(x, [val(d[cadence][f"{rk}_daily_same_users"]) for d in r["days"]], ls=":", color=color,
                 label=f"daily, same users as {cadence}")
    ax1.set_ylabel(f"{rk}")
    ax1.legend(fontsize=8)
    ax1.set_title(f"Staleness: snapshot refresh cadence ({r['from']} → {r['to']})")
    if not r["daily_user_windows"]:
        ax1.text(0.5, 0.5, "no eligible held-out test user in this period", ha="center", va="center",
                 transform=ax1.transAxes, color="tab:red")
    ax2.bar(x, [d["recomputed"] for d in r["days"]], color="tab:gray")
    ax2.set_ylabel("users recomputed")
    step = max(1, len(days) // 10)
    ax2.set_xticks(x[::step], days[::step], rotation=30, ha="right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
