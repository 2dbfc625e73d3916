"""Item vectors stored as int8 with one affine map per table (TransAct V2 keeps 16k-action sequences this way):

    q = clamp(round(x / scale) + zero, -128, 127)          x ≈ scale · (q - zero)

with scale = (hi - lo) / 255 and the integer zero point zero = round(-128 - lo / scale) over the whole table, where
lo = min(min x, 0) and hi = max(max x, 0) (the range always holds 0). The smallest value maps to -128 and the
largest to 127; every element is recovered within scale / 2, the two ends within one step (the zero point is
rounded); 0 is stored exactly, so an item without a vector (a zero row) stays a zero vector. At use the vectors are
dequantised and L2-normalised (`dequantize_normalize`), so the comparison by dot product is a cosine.

`int8_table` builds the table of a ranker: vectors wider than `dim` are first mapped by a fixed orthonormal
projection (seeded: the same on every machine; dot products approximately kept), so sequences of thousands of
tokens stay cheap to move.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pinnerformer.errors import PinnerformerError

DEFAULT_TABLE_DIM = 64  # TransAct V2's int8 table width (wider vectors are projected to it)


@dataclass(frozen=True)
class Int8Vectors:
    q: np.ndarray  # [N, D] int8 (may be memory-mapped)
    scale: float
    zero: int  # the zero point: the integer that stands for 0.0
    lo: float | None = None  # the quantised float range (widened to hold 0), where known
    hi: float | None = None

    def __post_init__(self):
        if self.q.dtype != np.int8 or self.q.ndim != 2:
            raise PinnerformerError(f"int8 vectors: expected a [N, D] int8 array, found {self.q.dtype} "
                                    f"{list(self.q.shape)}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise PinnerformerError(f"int8 vectors: the quantisation scale {self.scale} is not a positive finite "
                                    "number")
        if not (float(self.zero).is_integer() and -128 <= self.zero <= 127):
            raise PinnerformerError(f"int8 vectors: the zero point {self.zero} is not an integer in [-128, 127]")

    @property
    def max_error(self) -> float:
        """The largest difference between a stored element (not at either end of the range) and its original."""
        return self.scale / 2

    def dequantize(self) -> np.ndarray:
        return (self.scale * (self.q.astype(np.float32) - self.zero)).astype(np.float32)


def affine_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) for values in [lo, hi] (the range widened to hold 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    return scale, int(np.clip(np.rint(-128 - lo / scale), -128, 127))


def quantize(x: np.ndarray) -> Int8Vectors:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise PinnerformerError("quantize: expected a [N, D] array of finite values")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    scale, zero = affine_params(lo, hi)
    q = np.clip(np.rint(x / scale) + zero, -128, 127).astype(np.int8)
    return Int8Vectors(q, scale, zero, lo, hi)


def orthonormal_projection(d_in: int, d_out: int, seed: int = 0) -> np.ndarray:
    """[d_in, d_out] with orthonormal columns (the identity when d_out >= d_in)."""
    if d_out >= d_in:
        return np.eye(d_in, dtype=np.float32)
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_in, d_out, generator=g, dtype=torch.float64)).Q.float().numpy()


def int8_table(vectors: np.ndarray, dim: int, seed: int = 0) -> Int8Vectors:
    """A ranker's int8 item table: the vectors, narrowed to `dim` when wider, quantised."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return quantize(vectors @ orthonormal_projection(vectors.shape[1], dim, seed))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_int8(path: Path, shape: tuple[int, int], scale: float, zero: int, lo: float, hi: float, sha256: str,
              where: str) -> Int8Vectors:
    """A stored int8 table, memory-mapped, checked against what was recorded beside it (`where` names the record):
    the file exists and is unchanged, the shape, and scale / zero point consistent with the recorded range."""
    if not path.exists():
        raise PinnerformerError(f"{path}: the int8 item table named in {where} is missing (prepare the ranking data "
                                "again)")
    if file_sha256(path) != sha256:
        raise PinnerformerError(f"{path}: the int8 item table changed since it was written (its sha256 differs "
                                f"from {where}.sha256); prepare the ranking data again")
    q = np.load(path, mmap_mode="r")
    if q.dtype != np.int8 or tuple(q.shape) != tuple(shape):
        raise PinnerformerError(f"{path}: expected int8 {list(shape)} as {where}.shape records, found {q.dtype} "
                                f"{list(q.shape)}")
    want_scale, want_zero = affine_params(lo, hi)
    if not (np.isfinite(scale) and scale > 0 and abs(scale - want_scale) <= 1e-6 * want_scale
            and zero == want_zero):
        raise PinnerformerError(f"{where}: the quantisation scale {scale} / zero point {zero} is inconsistent with "
                                f"the stored vectors' range [{lo}, {hi}] (expected scale {want_scale:.6g}, zero point "
                                f"{want_zero}): the table would dequantise to other vectors")
    return Int8Vectors(q, scale, zero)


def dequantize_normalize(q: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """int8 [..., D] -> float32 unit vectors [..., D] (a zero vector stays zero)."""
    x = scale * (q.float() - zero)
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
