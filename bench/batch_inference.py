"""Batch inference throughput of the daily embedding job: users/s, model FLOPs per user, and MFU.

Times the job's own embedding function (`training/trainer.embed_users(fixed_shape=True)`: feature arrays, padding to max_len, the
transformer (its last block and the head at the newest position only)) on users with full-length histories (M actions each), for a
model of the given preset. Weights are freshly initialised: speed does not depend on their values.

FLOPs per user are *counted*, not estimated: torch's FlopCounterMode over one batch (matmuls, and attention through
the math backend so that every device counts it alike), divided by the batch size. MFU = counted FLOPs/s over the matmul rate measured on the same device in the same dtype
(fp32 on CPU; bf16 autocast on GPU).

    python bench/batch_inference.py --preset small                          # CPU
    python bench/batch_inference.py --preset paper --device cuda --compile  # GPU, bf16
    python bench/batch_inference.py --preset small --job                    # the whole job (embed CLI path)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from device_rates import assert_compiled, describe, peak_rate, profile_to, sync  # bench/ is on sys.path
from generated import generated_dataset
from pinnerformer.features.sequence_batch import build_sequence_batch, to_torch
from pinnerformer.training.config import load_config
from pinnerformer.models.embedding import embed_users
from pinnerformer.models.pinnerformer import pinnerformer_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--users", type=int, default=4096, help="users with full-length histories in the dataset")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="timed passes over all users")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (model.user_state)")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="reduce-overhead: also as CUDA graphs; max-autotune: also tuned Triton matmuls (slow start)")
    ap.add_argument("--reference", action="store_true",
                    help="also time the model alone on one batch already on the device (no feature building)")
    ap.add_argument("--profile", type=Path, help="write a torch.profiler table of one pass to this file")
    ap.add_argument("--override", default="{}", help='config overrides as JSON, e.g. \'{"model": {"residual_dtype": '
                    '"compute"}}\'')
    ap.add_argument("--job", action="store_true", help="also time the whole `embed` job (local engine)")
    args = ap.parse_args()

    cfg = load_config(args.preset, overrides=json.loads(args.override))
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    tmp = tempfile.TemporaryDirectory()
    M = cfg.data.max_len
    ds = generated_dataset(Path(tmp.name), args.users, M)
    torch.manual_seed(cfg.seed)
    model = pinnerformer_for(ds, cfg.model, M).to(dev).eval()
    tl = ds.timelines
    starts, ends = np.asarray(tl.offsets[:-1]), np.asarray(tl.offsets[1:])
    assert (ends - starts == M).all()

    peak_before = peak_rate(dev)
    # FLOPs per user, counted on one batch. Attention is counted through the math backend (plain matmuls, the full
    # T×T as is the convention): FlopCounterMode has no formula for the CPU's fused attention kernel and would
    # count it as 0, so the count is the same on every device.
    B = min(args.batch_size, len(starts))
    b = to_torch(build_sequence_batch(tl, starts[:B], ends[:B], model.time_features, pad_to=M), dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), \
            torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        model.user_embedding(b)
    flops_per_user = fc.get_total_flops() / B
    # Compile only after counting: a compiled function first called under FlopCounterMode is never compiled at all
    # (dynamo skips that frame for good and every later call runs eager; seen with torch 2.11 and 2.13).
    if args.compile:
        model.user_state = torch.compile(model.user_state, dynamic=False, mode=args.compile_mode)

    embed_users(model, tl, starts[:2 * B], ends[:2 * B], dev, args.batch_size, fixed_shape=True)  # warm-up (and compile)
    if args.compile:
        assert_compiled()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.reps):
        embed_users(model, tl, starts, ends, dev, args.batch_size, fixed_shape=True)
    sync(dev)
    wall = time.perf_counter() - t0
    users_per_s = args.reps * len(starts) / wall
    peak_after = peak_rate(dev)
    peak = max(peak_before, peak_after)  # the higher of the two readings: MFU is not flattered by a slow one
    res = {"preset": args.preset, "override": json.loads(args.override), **describe(dev),
           "compile": args.compile and args.compile_mode, "batch": args.batch_size, "max_len": M, "users": len(starts),
           "users_per_s": round(users_per_s, 1), "gflops_per_user": round(flops_per_user / 1e9, 4),
           "model_tflops_per_s": round(users_per_s * flops_per_user / 1e12, 4),
           "matmul_peak_tflops_per_s": round(peak / 1e12, 3),
           "matmul_peak_before_after": [round(peak_before / 1e12, 3), round(peak_after / 1e12, 3)], "mfu": round(users_per_s * flops_per_user / peak, 3),
           "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    if args.reference:  # the model alone: the same batch, already on the device, over and over
        def one():
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                return model.user_embedding(b)
        for _ in range(3):
            one()
        sync(dev)
        t = time.perf_counter()
        n_ref = 20 if dev.type == "cuda" else 2
        for _ in range(n_ref):
            one()
        sync(dev)
        ref = n_ref * B / (time.perf_counter() - t)
        res.update(model_alone_users_per_s=round(ref, 1), model_alone_mfu=round(ref * flops_per_user / peak, 3))
    if args.profile:
        profile_to(args.profile, dev, lambda: embed_users(model, tl, starts, ends, dev, args.batch_size,
                                                          fixed_shape=True))
    if args.job:
        # The whole job as `pinnerformer embed` runs it: plan, shards, Parquet parts, merge, manifest.
        from pinnerformer.inference.daily_embed import DailyJob
        from pinnerformer.training.retrieval import retrieval_loop

        run = Path(tmp.name) / "run"
        retrieval_loop(ds, load_config(args.preset, overrides={"device": "cpu"}), run, log=lambda s: None).fit(
            progress=False, max_steps=1)
        import datetime as dt

        day = dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc).date()
        m = DailyJob(run, ds, day, Path(tmp.name) / "snaps", batch_size=args.batch_size, device=dev.type,
                     compile=args.compile).run(log=lambda s: None, progress=False)
        res["job_users_per_s"] = round(m.users / m.wall_s, 1)
        res["job_compile"] = "default" if args.compile else False  # the job's --compile has no mode choice
        res["job_wall_s"] = m.wall_s
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
