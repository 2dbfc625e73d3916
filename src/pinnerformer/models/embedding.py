"""Batched embeddings from a trained retrieval model: users from ranges of their timelines, and the whole catalogue.

One implementation for every stage that needs vectors: validation during training, offline evaluation, the daily
job, the item index.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pinnerformer.data.timelines import Timelines
from pinnerformer.features.sequence_batch import build_sequence_batch, to_torch
from pinnerformer.models.pinnerformer import PinnerFormer


def prefetched(fn, items, threads: int):
    """fn(x) for x in items, in order. With threads > 0 the next results are computed ahead in a thread pool
    (numpy's array work releases the GIL), so host-side preparation overlaps the GPU's work."""
    if threads <= 0:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        window = deque(pool.submit(fn, x) for x in itertools.islice(it, 2 * threads))
        while window:
            done = window.popleft().result()
            for x in itertools.islice(it, 1):
                window.append(pool.submit(fn, x))
            yield done


@torch.no_grad()
def embed_users(model: PinnerFormer, timelines: Timelines, starts: np.ndarray, ends: np.ndarray,
                device: torch.device, batch_size: int = 256, fixed_shape: bool = False) -> torch.Tensor:
    """User embeddings from the last M actions of each [start, end) range. [U, D] float32 (on `device`).

    fixed_shape: every model call is [batch_size, max_len] (sequences padded to max_len, the last batch filled up
    with copies of its first user, results dropped). Kernels then run the same instruction sequence for every row
    whichever users share the batch, so a user's vector is bit-for-bit the same in a partial recompute and in a
    full one (same batch_size and device): what the daily job relies on. Otherwise batches are padded to their
    longest sequence only (cheaper for evaluation). On GPU, two threads build the next batches' features (into
    pinned memory) while the current one computes."""
    model.eval()
    M = model.spec.max_len
    starts = np.maximum(starts, ends - M)
    cuda = device.type == "cuda"

    def host_batch(i: int) -> tuple[int, dict[str, torch.Tensor]]:
        s, e = starts[i:i + batch_size], ends[i:i + batch_size]
        n = len(s)
        if fixed_shape and n < batch_size:
            s, e = np.concatenate([s, np.repeat(s[:1], batch_size - n)]), np.concatenate([e, np.repeat(e[:1], batch_size - n)])
        tensors = to_torch(build_sequence_batch(timelines, s, e, model.time_features, pad_to=M if fixed_shape else None))
        return n, ({k: v.pin_memory() for k, v in tensors.items()} if cuda else tensors)

    out = []
    for n, host in prefetched(host_batch, range(0, len(starts), batch_size), threads=2 if cuda else 0):
        b = to_torch(host, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out.append(model.user_embedding(b)[:n].float())
    return torch.cat(out) if out else torch.zeros((0, model.out_dim), device=device)


@torch.no_grad()
def embed_items(model: PinnerFormer, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """[n_items, D] float32: every item of the catalogue through the item tower."""
    model.eval()
    n = model.spec.n_items
    out = []
    for i in range(0, n, chunk):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.item_embedding(torch.arange(i, min(i + chunk, n), device=device)).float())
    return torch.cat(out)
