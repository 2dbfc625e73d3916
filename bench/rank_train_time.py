"""How long the ranker takes to train to early stop on real ranking data (issue 31's target: the ML-1M default ranker
in <= 15 min on 2 CPU cores), with its size and what it reached on validation.

Runs `pinnerformer.train_ranker` (the command's own path: the default preset unless told otherwise) on prepared
ranking data into a fresh folder, and reports the whole call's wall time, the training's own (`TrainSummary.wall_s`),
the epochs, the best epoch and its validation figure, the number of parameters, the training rows per second and
the peak memory of the process.

    pinnerformer rank prepare --dataset $WORK/ml1m --output $WORK/ml1m-rank --item-vectors content \\
        --split 2001-03-23,2001-11-22 --min-candidates 5
    python bench/rank_train_time.py --data $WORK/ml1m-rank                  # the default ranker
    python bench/rank_train_time.py --data $WORK/ml1m-rank --model gbdt     # the trees, for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

import pinnerformer as pf
from pinnerformer.data.requests import RankData
from pinnerformer.ranking.run import RankRun


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="ranking data (pinnerformer rank prepare)")
    p.add_argument("--model", default=None, help="transact (the default) | none | gbdt | ...")
    p.add_argument("--preset", default="default")
    p.add_argument("--config", type=Path, default=None, help="JSON overrides, as `rank train --config`")
    p.add_argument("--output", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    config = json.loads(args.config.read_text()) if args.config else None
    out = args.output or Path(tempfile.mkdtemp(prefix="rank-train-time-")) / "run"
    rd = RankData(args.data)
    t0 = time.perf_counter()
    summary = pf.train_ranker(rd, out, model=args.model, preset=args.preset, config=config, progress=True,
                              log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    model = RankRun(out).load_model(rd)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) if isinstance(model, torch.nn.Module) else None
    result = {
        "data": str(args.data), "fingerprint": rd.manifest.fingerprint, "model": args.model or "default",
        "preset": args.preset, "config": config, "wall_s": round(wall, 1), "train_wall_s": round(summary.wall_s, 1),
        "stopped_by": summary.stopped_by, "steps": summary.steps, "best_epoch": summary.best_epoch,
        "metric": summary.metric, "best": summary.best, "parameters": params,
        "training_requests": len(rd.requests_in("train")),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.output is None:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
