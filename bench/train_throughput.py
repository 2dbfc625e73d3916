"""Training throughput of PinnerFormer: sequences/s, tokens/s and model-FLOPs utilisation (MFU).

Runs real training steps (example cutting, features, model, item tower, negative pool, logQ, loss, backward,
AdamW) on a generated dataset shaped for the preset, and divides the model FLOPs it counts by the matmul
rate it measures on the same device (fp32 on CPU, bf16 on GPU).

    python bench/train_throughput.py --preset small                    # CPU
    python bench/train_throughput.py --preset paper --device cuda --compile

FLOPs are counted for matmuls only (2·m·n·k each), forward ×3 for forward + backward:
    per input token   2·(F·H + L·12·H²) + L·4·T·H (attention scores and values, full T×T as is the convention)
                      + 2·(H·4H + 4H·D) for the output head, which runs at every position
    per pool item     2·(F_item·h + h·D) for the item tower; per query 2·N_pool·D for the logits
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from device_rates import matmul_rate, sync  # bench/ is on sys.path when run as a script
from pinnerformer.data import Dataset
from pinnerformer.data.formats import EventColumns, read_source
from pinnerformer.data.prepare import prepare
from pinnerformer.data.synthetic import planted_interest_log
from pinnerformer.training.config import load_config
from pinnerformer.training.trainer import Trainer


def step_flops(trainer: Trainer, tokens: int, queries: int, pool: int, uniq_items: int, T: int) -> float:
    c = trainer.model_cfg
    H, L, D = c.width, c.layers, c.dim
    F_in = trainer.model.input_proj.in_features
    F_item = trainer.model.items.out_dim
    per_token = 2 * (F_in * H + L * 12 * H * H) + L * 4 * T * H + 2 * (H * 4 * H + 4 * H * D)
    item_tower = 2 * (F_item * c.item_tower_hidden + c.item_tower_hidden * D)
    fwd = tokens * per_token + uniq_items * item_tower + queries * (pool + 1) * 2 * D
    return 3.0 * fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dataset", type=Path, help="a prepared dataset (default: generated, shaped for the preset)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--compile", action="store_true", help="torch.compile the sequence encoder")
    args = ap.parse_args()

    over = {"device": args.device}
    if args.batch_size:
        over["optim"] = {"batch_size": args.batch_size}
    cfg = load_config(args.preset, overrides=over)
    tmp = tempfile.TemporaryDirectory()
    if args.dataset is None:
        M = cfg.data.max_len
        log = planted_interest_log(n_users=max(4 * cfg.optim.batch_size, 600), n_items=20_000, n_groups=200,
                                   events_per_user=2 * M, gap_s=600)
        log.write_csv(Path(tmp.name) / "log.csv")
        raw = read_source("events", Path(tmp.name) / "log.csv", positive="click",
                          event_columns=EventColumns(action="action"))
        prepare(raw, Path(tmp.name) / "ds", "events", log=lambda s: None)
        args.dataset = Path(tmp.name) / "ds"
    ds = Dataset.open(args.dataset)
    trainer = Trainer(ds, cfg, Path(tmp.name) / "run", log=lambda s: None)
    dev = trainer.device
    if args.compile:
        trainer.model.encode_sequence = torch.compile(trainer.model.encode_sequence)
    B = cfg.optim.batch_size
    order = np.random.default_rng(0).permutation(np.repeat(trainer.sampler.eligible, 64))
    trainer.model.train()
    counts = {"tokens": 0, "flops": 0.0}
    orig_sample = trainer.sampler.sample

    def counting_sample(users, rng):
        b = orig_sample(users, rng)
        T = int((b.ends - b.starts).max())
        q = len(b.q_item)
        pool = (q if cfg.loss.negatives != "random" else 0) + (cfg.loss.n_random if cfg.loss.negatives != "in-batch" else 0)
        uniq = len(np.unique(b.q_item)) + min(pool, ds.manifest.n_items)
        counts["tokens"] += int((b.ends - b.starts).sum())
        counts["flops"] += step_flops(trainer, B * T, q, pool, uniq, T)  # padded tokens are computed too
        return b

    trainer.sampler.sample = counting_sample
    t0 = None
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            sync(dev)
            t0 = time.perf_counter()
            counts = {"tokens": 0, "flops": 0.0}
        rng = np.random.default_rng([0, s])
        loss = trainer.loss_on(order[s * B:(s + 1) * B], rng, torch.Generator().manual_seed(s))
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.opt.step()
    sync(dev)
    wall = time.perf_counter() - t0
    peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = matmul_rate(dev, peak_dtype, 8192 if dev.type == "cuda" else 2048, 50 if dev.type == "cuda" else 5)
    achieved = counts["flops"] / wall
    res = {"preset": args.preset, "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
           "dtype": "bf16 autocast" if dev.type == "cuda" else "fp32", "compile": args.compile,
           "batch": B, "max_len": cfg.data.max_len, "steps_timed": args.steps,
           "sequences_per_s": round(args.steps * B / wall, 1), "tokens_per_s": round(counts["tokens"] / wall),
           "model_tflops_per_s": round(achieved / 1e12, 3), "matmul_peak_tflops_per_s": round(peak / 1e12, 3),
           "mfu": round(achieved / peak, 3), "parameters": sum(p.numel() for p in trainer.model.parameters()),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
