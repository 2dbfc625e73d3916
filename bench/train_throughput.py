"""Training throughput of PinnerFormer: sequences/s, tokens/s and model-FLOPs utilisation (MFU).

Runs the trainer's own steps (its loader: example cutting and features, in worker processes on GPU; then the
model, item tower, negative pool, logQ, loss, backward, AdamW; numbers read one step late, as `fit` does) on a
generated dataset shaped for the preset, and divides the model FLOPs it counts by the matmul rate it measures
on the same device (fp32 on CPU, bf16 on GPU). On GPU it also lists any host-device synchronisation inside a
step (there should be none), and `--reference` times the encoder alone for comparison.

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
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from device_rates import assert_compiled, describe, peak_rate, profile_to, sync  # bench/ is on sys.path
from generated import generated_dataset
from pinnerformer.data import Dataset
from pinnerformer.features.sequence_batch import to_torch
from pinnerformer.training.config import load_config, merge_dicts
from pinnerformer.training.loop import TrainingLoop
from pinnerformer.training.retrieval import retrieval_loop


def encoder_flops_per_token(trainer: TrainingLoop, T: int) -> float:
    """Forward matmul FLOPs of the sequence encoder per (padded) token of a length-T batch, head included."""
    c = trainer.model.cfg
    H, L, D = c.width, c.layers, c.dim
    F_in = trainer.model.input_proj.in_features
    return 2 * (F_in * H + L * 12 * H * H) + L * 4 * T * H + 2 * (H * 4 * H + 4 * H * D)


def step_flops(trainer: TrainingLoop, tokens: int, queries: int, pool: int, uniq_items: int, T: int) -> float:
    c = trainer.model.cfg
    item_tower = 2 * (trainer.model.items.out_dim * c.item_tower_hidden + c.item_tower_hidden * c.dim)
    fwd = tokens * encoder_flops_per_token(trainer, T) + uniq_items * item_tower + queries * (pool + 1) * 2 * c.dim
    return 3.0 * fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dataset", type=Path, help="a prepared dataset (default: generated, shaped for the preset)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int, default=-1, help="loader worker processes (-1: the trainer's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the sequence encoder")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--reference", action="store_true",
                    help="also time the encoder alone (forward + backward + AdamW, no examples, item tower or loss)")
    ap.add_argument("--profile", type=Path, help="write a torch.profiler table of 5 steps to this file")
    ap.add_argument("--trace", type=Path, help="with --profile: also the Chrome trace of those steps (.json.gz)")
    ap.add_argument("--override", default="{}", help='config overrides as JSON, e.g. \'{"model": {"dropout": 0}}\'')
    args = ap.parse_args()

    over = {"device": args.device, "compile": args.compile, "compile_mode": args.compile_mode,
            "loader_workers": args.workers}
    if args.batch_size:
        over["optim"] = {"batch_size": args.batch_size}
    over = merge_dicts(over, json.loads(args.override))
    over = merge_dicts({"data": {"sequences_per_user": 64}}, over)  # an epoch long enough for every timed step
    cfg = load_config(args.preset, overrides=over)
    tmp = tempfile.TemporaryDirectory()
    if args.dataset is None:
        ds = generated_dataset(Path(tmp.name), max(4 * cfg.optim.batch_size, 600), 2 * cfg.data.max_len)
    else:
        ds = Dataset.open(args.dataset)
    trainer = retrieval_loop(ds, cfg, Path(tmp.name) / "run", log=lambda s: None)
    task = trainer.task
    dev = trainer.device
    B = cfg.optim.batch_size
    n_steps = args.warmup + args.steps + (5 if args.profile else 0)
    # the trainer's own pipeline: loader (worker processes on GPU) -> train_step, numbers read one step late
    assert task.steps_per_epoch >= n_steps + 1, "the generated dataset is too small for that many steps"
    batches = iter(trainer.loader(0, 0))
    trainer.model.train()

    def step_counts(prep) -> tuple[int, float]:
        ex = prep.examples
        T = prep.seq["item"].shape[1]
        q = len(ex.q_item)
        pool = (q if cfg.loss.negatives != "random" else 0) + (cfg.loss.n_random if cfg.loss.negatives != "in-batch" else 0)
        uniq = len(np.unique(ex.q_item)) + min(pool, ds.manifest.n_items)
        return int((ex.ends - ex.starts).sum()), step_flops(trainer, B * T, q, pool, uniq, T)  # padding computes too

    peak_before = peak_rate(dev)
    counts = {"tokens": 0, "flops": 0.0}
    host_ms = {"wait_for_batch": 0.0, "queue_step": 0.0, "read_loss": 0.0}  # where the host spends a step
    host_syncs: list[str] = []
    t0, last = None, None
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            sync(dev)
            t0 = time.perf_counter()
            counts = {"tokens": 0, "flops": 0.0}
            host_ms = dict.fromkeys(host_ms, 0.0)
        t_a = time.perf_counter()
        prep = next(batches)
        t_b = time.perf_counter()
        tok, fl = step_counts(prep)
        counts["tokens"] += tok
        counts["flops"] += fl
        if dev.type == "cuda" and s == args.warmup - 1:  # one warm step under the sync detector
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                out = trainer.train_step(prep, s, 0)
                torch.cuda.set_sync_debug_mode(0)
            host_syncs = sorted({str(w.message).splitlines()[0][:120] for w in caught})
        else:
            out = trainer.train_step(prep, s, 0)
        t_c = time.perf_counter()
        if last is not None:
            last.read()  # read one step late, as fit() does
        last = out
        for k, dt in zip(host_ms, (t_b - t_a, t_c - t_b, time.perf_counter() - t_c)):
            host_ms[k] += 1e3 * dt
    sync(dev)
    wall = time.perf_counter() - t0
    if args.compile:  # the encoder, and the fused loss unless negatives=full
        assert_compiled(graphs=1 + (cfg.loss.negatives != "full"))
    if args.profile:
        profile_to(args.profile, dev, lambda: [trainer.train_step(next(batches), 10_000 + s, 0) for s in range(5)],
                   trace=args.trace)
    peak_after = peak_rate(dev)
    peak = max(peak_before, peak_after)  # the higher of the two readings: MFU is not flattered by a slow one
    achieved = counts["flops"] / wall
    res = {"preset": args.preset, "override": json.loads(args.override), **describe(dev), "compile": args.compile and args.compile_mode,
           "batch": B, "max_len": cfg.data.max_len, "loader_workers": trainer.workers, "steps_timed": args.steps,
           "ms_per_step": round(1e3 * wall / args.steps, 2),
           "sequences_per_s": round(args.steps * B / wall, 1), "tokens_per_s": round(counts["tokens"] / wall),
           "model_tflops_per_s": round(achieved / 1e12, 3), "matmul_peak_tflops_per_s": round(peak / 1e12, 3),
           "matmul_peak_before_after": [round(peak_before / 1e12, 3), round(peak_after / 1e12, 3)],
           "mfu": round(achieved / peak, 3), "parameters": sum(p.numel() for p in trainer.model.parameters()),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    res["host_ms_per_step"] = {k: round(v / args.steps, 2) for k, v in host_ms.items()}
    t = time.perf_counter()
    for _ in range(3):
        task.batch_for(task.sampler.eligible[:B], np.random.default_rng(0))
    res["prepare_one_batch_ms"] = round(1e3 * (time.perf_counter() - t) / 3, 1)  # in the main process
    if dev.type == "cuda":
        res["host_syncs_in_a_step"] = host_syncs
    if args.reference:
        res.update(encoder_alone(trainer, next(batches), args.steps, peak))
    print(json.dumps(res, indent=2))


def encoder_alone(trainer: TrainingLoop, prep, steps: int, peak: float) -> dict:
    """The sequence encoder by itself on one batch, over and over: forward, backward of a plain sum, AdamW.
    What the transformer reaches without example cutting, the item tower, the negatives or the loss."""
    dev = trainer.device
    seq = to_torch(prep.seq, dev)
    B, T = seq["item"].shape
    flops = 3.0 * B * T * encoder_flops_per_token(trainer, T)

    def one() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = trainer.model.encode_sequence(seq)
        trainer.opt.zero_grad(set_to_none=True)
        out.float().sum().backward()
        trainer.opt.step()

    for _ in range(3):
        one()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    sync(dev)
    wall = time.perf_counter() - t
    return {"encoder_alone_ms_per_step": round(1e3 * wall / steps, 2),
            "encoder_alone_tflops_per_s": round(flops * steps / wall / 1e12, 3),
            "encoder_alone_mfu": round(flops * steps / wall / peak, 3)}


if __name__ == "__main__":
    sys.exit(main())
