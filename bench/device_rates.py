"""What a device can do, measured the same way for every benchmark: the dense-matmul rate that MFU divides by."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int, trials: int = 5) -> float:
    """FLOP/s of an n×n @ n×n matmul in `dtype` (fp32 on CPU, bf16 on GPU in our benches): the median of
    `trials` timings of `reps` products each, on random data (zeros run faster), after a warm-up."""
    pairs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
             for _ in range(2)]
    for a, b in pairs * 2:
        a @ b
    sync(device)
    rates = []
    for _ in range(trials):
        t = time.perf_counter()
        for i in range(reps):
            a, b = pairs[i % 2]
            a @ b
        sync(device)
        rates.append(2 * n ** 3 * reps / (time.perf_counter() - t))
    return statistics.median(rates)


def peak_rate(device: torch.device) -> float:
    """The ceiling MFU is measured against: bf16 8192² on GPU, fp32 2048² on CPU."""
    if device.type == "cuda":
        return matmul_rate(device, torch.bfloat16, 8192, 20)
    return matmul_rate(device, torch.float32, 2048, 3, trials=3)


def assert_compiled(graphs: int = 1) -> None:
    """Stop unless --compile produced at least `graphs` graphs (one per compiled function): timings of eager code
    must never be reported as compiled ones."""
    import torch._dynamo.utils

    got = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if got < graphs:
        raise SystemExit(f"--compile was asked for but torch.compile produced {got} graph(s), expected {graphs}: "
                         "part of the model would run eager")


def describe(device: torch.device) -> dict:
    """The device and compute dtype every result records."""
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "dtype": "bf16 autocast" if cuda else "fp32"}


def profile_to(path: Path, device: torch.device, fn, trace: Path | None = None) -> None:
    """A torch.profiler table of fn() (top 40 by device time) written to `path`, and its Chrome trace if asked."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    if trace:
        prof.export_chrome_trace(str(trace))
