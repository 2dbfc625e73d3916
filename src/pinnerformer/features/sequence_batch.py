"""Timeline ranges -> padded per-action feature arrays, the model's input.

Each example is a contiguous range [start, end) of one user's events (oldest first). Arrays are right-padded
to the longest range in the batch; padding has item 0, action/surface -1 (-> the reserved "unknown" row)
and NaN duration. Time features are computed here in int64/float64, where absolute Unix seconds are exact,
and handed to the model as float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pinnerformer.data.timelines import Timelines

# Periods of the Time2Vec-style time encodings (the PinnerFormer paper's time features): the batch computes the phase of absolute
# times exactly here; the model turns the phases and relative times into cos/sin features.
HOUR, DAY, WEEK = 3600.0, 86400.0, 7 * 86400.0
ABS_PERIODS = [0.25 * HOUR, 0.5 * HOUR, 0.75 * HOUR, HOUR, 2 * HOUR, 4 * HOUR, 8 * HOUR, 16 * HOUR, DAY, 7 * DAY,
               28 * DAY, 365 * DAY]
REL_PERIODS = torch.logspace(0, math.log10(4 * WEEK), 32).tolist()  # 1 s … 4 weeks
_ABS_PERIODS_S = np.array(ABS_PERIODS, dtype=np.int64)  # all whole seconds (900 s … 365 d)


def build_sequence_batch(tl: Timelines, starts: np.ndarray, ends: np.ndarray, time_features: bool,
                         query_time: np.ndarray | None = None, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """pad_to: a fixed padded length (static shapes for compiled GPU kernels); default: the longest range."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts
    if (lengths < 1).any():
        raise ValueError("every example needs at least one action")
    T = int(lengths.max()) if pad_to is None else max(int(pad_to), int(lengths.max()))
    pos = np.arange(T)
    valid = pos[None, :] < lengths[:, None]
    idx = np.where(valid, starts[:, None] + pos[None, :], 0)
    out = {
        "item": np.where(valid, tl.item[idx], 0).astype(np.int64),
        "action": np.where(valid, tl.action[idx], -1).astype(np.int64),
        "surface": np.where(valid, tl.surface[idx], -1).astype(np.int64),
        "duration": np.where(valid, tl.duration[idx], np.nan).astype(np.float32),
        "length": lengths,
    }
    if time_features:
        ts = np.asarray(tl.ts[idx], dtype=np.int64)
        newest = ts[np.arange(len(starts)), lengths - 1]
        q = newest if query_time is None else np.asarray(query_time, dtype=np.int64)
        prev = np.concatenate([ts[:, :1], ts[:, :-1]], axis=1)  # the first action's gap is 0
        out["t_since"] = np.where(valid, np.clip(q[:, None] - ts, 0, None), 0).astype(np.float32)
        out["t_gap"] = np.where(valid, ts - prev, 0).astype(np.float32)
        out["t_abs_frac"] = ((ts[..., None] % _ABS_PERIODS_S) / _ABS_PERIODS_S).astype(np.float32)
        out["t_abs_days"] = (ts / 86400.0).astype(np.float32)
    return out


def to_torch(batch: dict[str, np.ndarray | torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Host arrays -> tensors on `device`. To a GPU they go through pinned (page-locked) memory with non-blocking
    copies: a copy from ordinary memory makes the host wait until the GPU has finished all queued work, so the
    next batch could not be prepared while the current one computes."""
    cuda = torch.device(device).type == "cuda"
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        out[k] = t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
    return out
