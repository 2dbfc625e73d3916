"""Ingestion benchmark: `pinnerformer data prepare` on a generated event log.

Generates a CSV event log (default 10M events: user, item, action, timestamp, surface, duration; Zipf-like
item popularity, bursty per-user times, 0.5% exact duplicates), then runs the real CLI in a child process
and reports wall time and the child's peak resident memory. Generation is not timed.

    python bench/ingest.py --events 10000000 [--workdir /tmp/pf-ingest] [--format csv|parquet]

Target (issue 2): under 60 s and 4 GB on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl


def generate(path: Path, n_events: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_users = max(1, n_events // 100)
    n_items = max(1, n_events // 50)
    user = rng.integers(0, n_users, n_events)
    item = np.minimum((rng.pareto(1.2, n_events) * 50).astype(np.int64), n_items - 1)
    start = rng.integers(1_600_000_000, 1_700_000_000, n_users)
    ts = start[user] + rng.exponential(86_400 * 30, n_events).astype(np.int64)
    action = rng.choice(np.array(["click", "save", "closeup", "hide"]), n_events, p=[0.6, 0.15, 0.2, 0.05])
    surface = rng.choice(np.array(["home", "search", "related"]), n_events)
    duration = np.round(rng.exponential(20.0, n_events), 1)
    df = pl.DataFrame({"user": user, "item": item, "action": action, "timestamp": ts, "surface": surface,
                       "duration": duration})
    dup = rng.choice(n_events, n_events // 200, replace=False)
    df = pl.concat([df, df[dup]]).sample(fraction=1.0, shuffle=True, seed=seed)  # input not sorted
    if path.suffix == ".parquet":
        df.write_parquet(path)
    else:
        df.write_csv(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pf-ingest"))
    ap.add_argument("--format", choices=["csv", "parquet"], default="csv")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"events-{args.events}.{args.format}"
    if not src.exists():
        t = time.perf_counter()
        generate(src, args.events)
        print(f"generated {src} ({src.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    out = args.workdir / "dataset"
    cmd = [sys.executable, "-m", "pinnerformer.cli", "data", "prepare", "--format", "events", "--input", str(src),
           "--output", str(out), "--overwrite", "--action-col", "action", "--surface-col", "surface",
           "--duration-col", "duration", "--positive", "save,closeup", "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    stats = json.loads(proc.stdout)
    result = {"input": f"{args.format}, {src.stat().st_size / 1e6:.0f} MB", "events_in": args.events + args.events // 200,
              "events_out": stats["events"], "users": stats["users"], "items": stats["items"],
              "duplicates_removed": stats["duplicates_removed"], "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
              "events_per_s": round(stats["events"] / wall), "cpus": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
