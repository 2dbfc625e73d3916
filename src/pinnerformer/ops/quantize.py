"""Item vectors stored as int8 with one affine map per table (TransAct V2 keeps 16k-action sequences this way):

    q = clamp(round((x - zero) / scale), -128, 127)          x ≈ zero + scale · q

scale = (max - min) / 255 and zero = (max + min) / 2 + scale / 2 over the whole table, so the smallest value maps
to -128 and the largest to 127, and every element is recovered within scale / 2 (tested). At use the vectors are
dequantised and L2-normalised (`dequantize_normalize`), so the comparison by dot product is a cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pinnerformer.errors import PinnerformerError


@dataclass(frozen=True)
class Int8Vectors:
    q: np.ndarray  # [N, D] int8 (may be memory-mapped)
    scale: float
    zero: float

    def __post_init__(self):
        if self.q.dtype != np.int8 or self.q.ndim != 2:
            raise PinnerformerError(f"int8 vectors: expected a [N, D] int8 array, found {self.q.dtype} "
                                    f"{list(self.q.shape)}")
        if not (np.isfinite(self.scale) and self.scale > 0 and np.isfinite(self.zero)):
            raise PinnerformerError(f"int8 vectors: the quantisation scale {self.scale} / zero {self.zero} is not "
                                    "a positive finite scale and a finite zero point")

    @property
    def max_error(self) -> float:
        """The largest difference between a stored element and its original: half a step."""
        return self.scale / 2

    def dequantize(self) -> np.ndarray:
        return (self.zero + self.scale * self.q.astype(np.float32)).astype(np.float32)


def quantize(x: np.ndarray) -> Int8Vectors:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise PinnerformerError("quantize: expected a [N, D] array of finite values")
    lo, hi = float(x.min()), float(x.max())
    scale = max((hi - lo) / 255.0, 1e-12)
    zero = (hi + lo) / 2 + scale / 2
    q = np.clip(np.rint((x - zero) / scale), -128, 127).astype(np.int8)
    return Int8Vectors(q, scale, zero)


def dequantize_normalize(q: torch.Tensor, scale: float, zero: float) -> torch.Tensor:
    """int8 [..., D] -> float32 unit vectors [..., D] (a zero vector stays zero)."""
    x = zero + scale * q.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
