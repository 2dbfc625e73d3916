"""Example cutting speed: ms per batch for `ExampleSampler.sample` alone, and for the whole host-side preparation of a
training step (sampling + padded feature arrays, `RetrievalTask.batch_for`), on the generated data the training bench
uses (timelines of 2·M actions), for a preset's M, positions and batch size.

    python bench/example_sampler.py --preset paper     # M=256, 32 positions, batch 128
    python bench/example_sampler.py --preset small
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from generated import generated_dataset  # bench/ is on sys.path when run as a script
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import RetrievalTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()

    cfg = load_config(args.preset, overrides={"device": "cpu"})
    B, M = cfg.optim.batch_size, cfg.data.max_len
    tmp = tempfile.TemporaryDirectory()
    ds = generated_dataset(Path(tmp.name), max(4 * B, 600), 2 * M)
    task = RetrievalTask(ds, cfg)
    task.pad_to = M  # fixed-length batches, as on GPU
    sampler = task.sampler
    rng = np.random.default_rng(0)
    batches = [rng.choice(sampler.eligible, B, replace=False) for _ in range(args.batches)]

    t = time.perf_counter()
    queries = sum(len(sampler.sample(u, np.random.default_rng(i)).q_item) for i, u in enumerate(batches))
    sample_ms = 1e3 * (time.perf_counter() - t) / len(batches)
    t = time.perf_counter()
    for i, u in enumerate(batches):
        task.batch_for(u, np.random.default_rng(i))
    prepare_ms = 1e3 * (time.perf_counter() - t) / len(batches)
    print(json.dumps({"preset": args.preset, "objective": cfg.loss.objective, "batch": B, "max_len": M,
                      "positions": cfg.data.positions, "queries_per_batch": round(queries / len(batches)),
                      "sample_ms_per_batch": round(sample_ms, 2), "prepare_ms_per_batch": round(prepare_ms, 2)},
                     indent=2))


if __name__ == "__main__":
    main()
