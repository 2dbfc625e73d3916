"""The ranker's serving latency and training rate (issue 14's targets: CPU p99 <= 100 ms for one request of 500
candidates with 100-action sequences; >= 1,000 training examples/s on 2 cores).

Latency: one request (one user, one 100-action sequence) and C candidates through the whole ranker (candidate
features, PinnerFormer score, TransAct, DCN v2 cross network and MLP, the heads), eval mode, no autograd, timed
`--reps` times after `--warmup` calls; with the shared sequence projection (`forward_request`: the sequence part
of TransAct's first projection once per request) and without (every candidate's token matrix projected whole).
Training: the ranker's own loss step (forward, multi-task BCE, backward, AdamW) on batches of `--batch` rows drawn
`--rows-per-request` to a request, as pointwise training sees them.

    python bench/rank_latency.py                       # CPU, the paper's TransAct shape (seq 100, d = 96)
    python bench/rank_latency.py --device cuda --bf16 --compile --compile-mode reduce-overhead --requests 64
                                                       # the GPU issue: p99 of one request, rate at 64 per batch

`--requests N` also times batches of N requests (N users, each with its own sequence and C candidates) through the
request form and reports requests/s and candidates/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from pinnerformer.features.rank_batch import RankBatch
from pinnerformer.models.ranker import Ranker, RankerConfig, RankerInputs
from pinnerformer.objectives.multitask_bce import MultiTaskLossConfig, label_weight_matrix, multitask_bce


def make_model(args) -> Ranker:
    torch.manual_seed(0)
    cfg = RankerConfig.model_validate({"sequence": args.sequence, "transact": {"seq_len": args.seq_len},
                                       "cross_layers": 3, "cross_rank": args.cross_rank})
    inputs = RankerInputs(n_items=args.items, n_actions=4, n_surfaces=1, vector_dim=args.vector_dim, pf_dim=64,
                          heads=("save", "like", "hide"))
    return Ranker(cfg, inputs, torch.randn(args.items, args.vector_dim), torch.randn(args.items, 64))


def request_batch(args, n_requests: int, rows_per_request: int, rng: np.random.Generator) -> RankBatch:
    L, N = args.seq_len, n_requests * rows_per_request
    return RankBatch(
        seq_action=torch.from_numpy(rng.integers(1, 5, (n_requests, L))),
        seq_item=torch.from_numpy(rng.integers(0, args.items, (n_requests, L))),
        seq_age=torch.from_numpy(rng.uniform(1, 30 * 86400, (n_requests, L)).astype(np.float32)),
        user_vec=torch.randn(n_requests, 64), has_vector=torch.ones(n_requests, dtype=torch.bool),
        hour=torch.from_numpy(rng.integers(0, 24, n_requests)), surface=torch.ones(n_requests, dtype=torch.int64),
        row_request=torch.arange(n_requests).repeat_interleave(rows_per_request),
        cand_item=torch.from_numpy(rng.integers(0, args.items, N)),
        labels=torch.from_numpy((rng.random((N, 3)) < 0.2).astype(np.float32)), weight=torch.ones(N))


class CopyOut(torch.nn.Module):
    """An eager wrapper that copies a compiled (CUDA-graphed) module's output out of the graph's memory pool."""

    def __init__(self, compiled) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compiled(x).clone()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def latency(model: Ranker, batch: RankBatch, shared: bool, device: torch.device, warmup: int, reps: int,
            bf16: bool = False) -> dict:
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(warmup):
            model(batch, shared_projection=shared)
        times = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            model(batch, shared_projection=shared)
            sync(device)
            times.append(1000 * (time.perf_counter() - t))
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "mean_ms": round(float(np.mean(times)), 2), "max_ms": round(max(times), 2), "reps": reps}


def training_rate(model: Ranker, args, device: torch.device, rng: np.random.Generator) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m = label_weight_matrix(MultiTaskLossConfig(), list(model.inputs.heads)).to(device)
    n_req = max(1, args.batch // args.rows_per_request)
    batches = [request_batch(args, n_req, args.rows_per_request, rng).to(device) for _ in range(4)]
    for b in batches[:2]:  # warm-up
        loss = multitask_bce(model(b), b.labels, m, b.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    t, rows = time.perf_counter(), 0
    for i in range(args.train_steps):
        b = batches[i % len(batches)]
        loss = multitask_bce(model(b), b.labels, m, b.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows += b.n_rows
    sync(device)
    wall = time.perf_counter() - t
    return {"examples_per_s": round(rows / wall, 1), "ms_per_step": round(1000 * wall / args.train_steps, 1),
            "batch_rows": n_req * args.rows_per_request}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--cross-rank", type=int, default=RankerConfig().cross_rank,
                   help="the cross layers' rank (0: full rank, the ranker's default before issue 31)")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--sequence", default="transact", choices=["transact", "bst", "average", "none"])
    p.add_argument("--vector-dim", type=int, default=32, help="frozen item vector width (PinSage: 32)")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows-per-request", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile TransAct's request form, the cross network "
                   "and the MLP for the latency runs (inductor; the plain form stays eager)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--bf16", action="store_true", help="latency runs under bf16 autocast (training stays float32)")
    p.add_argument("--requests", type=int, default=0, help="also time batches of this many requests, each of "
                   "--candidates candidates (the request form)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    model = make_model(args).to(device)
    one = request_batch(args, 1, args.candidates, rng).to(device)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "candidates": args.candidates,
           "seq_len": args.seq_len, "sequence": args.sequence, "x0_width": model.x0_dim,
           "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["card"] = torch.cuda.get_device_name()
    out["bf16"] = args.bf16
    if args.compile:
        mode = args.compile_mode
        model.transact.forward_request = torch.compile(model.transact.forward_request, mode=mode)
        if mode == "default":
            model.cross, model.mlp = torch.compile(model.cross), torch.compile(model.mlp)
        else:  # CUDA graphs: the ranker concatenates cross(x0) and mlp(x0); a graph's output lives in its pool and
            # the next graph's run may overwrite it, so each output is copied out before the next graph runs
            model.cross = CopyOut(torch.compile(model.cross, mode=mode))
            model.mlp = CopyOut(torch.compile(model.mlp, mode=mode))
        out["compiled"] = mode
    out["shared_projection"] = latency(model, one, True, device, args.warmup, args.reps, args.bf16)
    out["plain"] = latency(model, one, False, device, args.warmup, args.reps, args.bf16)
    if args.requests:
        many = request_batch(args, args.requests, args.candidates, rng).to(device)
        t = latency(model, many, True, device, args.warmup, max(5, args.reps // 10), args.bf16)
        t.update(requests=args.requests, rows=many.n_rows,
                 requests_per_s=round(1000 * args.requests / t["mean_ms"], 1),
                 candidates_per_s=round(1000 * many.n_rows / t["mean_ms"]))
        t["note"] = "the request form runs request by request (one forward_request each): a serial rate"
        out["batched_requests"] = t
    if not args.compile:
        out["training"] = training_rate(model, args, device, rng)
    if args.compile and device.type == "cuda":
        from torch._dynamo.utils import counters
        # a "reduce-overhead" label says nothing if inductor skipped the graphs: report how often it did
        out["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
    print(json.dumps(out))  # one line: the log's last line is the result


if __name__ == "__main__":
    main()
