"""Every fast op against its plain reference: int8 vectors (round trip within half a step, zero rows exact), nearest-neighbour scores
without per-candidate copies (equal to the copying reference), top-k in time order (equal to the definition,
ties and padding included), and the fused compiled selection (equal to the eager one)."""

import numpy as np
import pytest
import torch

from pinnerformer.errors import PinnerformerError
from pinnerformer.ops.nn_select import (
    group_positions, nn_scores, nn_scores_reference, select_nearest, select_nearest_fused, top_k_in_time_order,
    top_k_reference,
)
from pinnerformer.ops.quantize import Int8Vectors, dequantize_normalize, int8_table, orthonormal_projection, quantize


def test_int8_round_trip_is_within_half_a_step_uses_the_whole_range_and_keeps_zero_rows_zero():
    x = np.random.default_rng(0).normal(0.1, 0.3, (500, 64)).astype(np.float32)
    x[7] = 0.0  # an item without a vector
    v = quantize(x)
    assert v.q.dtype == np.int8 and v.q.min() == -128 and v.q.max() == 127
    inside = (v.q > -128) & (v.q < 127)
    err = np.abs(v.dequantize() - x)
    assert err[inside].max() <= v.max_error * (1 + 1e-4) and err.max() <= v.scale * (1 + 1e-4)
    assert v.lo == float(x.min()) and v.hi == float(x.max())
    unit = dequantize_normalize(torch.from_numpy(v.q), v.scale, v.zero)
    ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
    assert torch.equal(unit[7], torch.zeros(64))  # 0 is stored exactly: no vector stays no vector
    real = torch.ones(500, dtype=torch.bool)
    real[7] = False
    assert torch.allclose(unit[real].norm(dim=-1), torch.ones(499), atol=1e-5)
    assert (unit[real] * ref[real]).sum(-1).min() > 0.999  # the direction survives quantisation
    positive = quantize(np.abs(x) + 1.0)  # the range is widened to hold 0
    assert positive.zero == -128 and np.abs(positive.dequantize() - (np.abs(x) + 1.0)).max() <= positive.scale
    with pytest.raises(PinnerformerError, match="scale 0.0 is not a positive finite number"):
        Int8Vectors(v.q, 0.0, v.zero)
    with pytest.raises(PinnerformerError, match="zero point 3.5 is not an integer"):
        Int8Vectors(v.q, v.scale, 3.5)
    with pytest.raises(PinnerformerError, match="expected a \\[N, D\\] int8 array, found float32"):
        Int8Vectors(x, v.scale, v.zero)
    with pytest.raises(PinnerformerError, match="finite values"):
        quantize(np.array([[np.nan, 1.0]]))


def test_the_int8_table_projection_keeps_dot_products_and_is_the_same_every_time():
    x = np.random.default_rng(1).normal(size=(300, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = int8_table(x, 64), int8_table(x, 64)
    assert a.q.shape == (300, 64) and np.array_equal(a.q, b.q) and (a.scale, a.zero) == (b.scale, b.zero)
    p = orthonormal_projection(384, 64)
    assert np.allclose(p.T @ p, np.eye(64), atol=1e-5)
    assert np.array_equal(int8_table(x[:, :32], 64).q, quantize(x[:, :32]).q)  # narrower: kept as it is


def grouped(seed=0, users=(3, 0, 5, 1), S=40, D=16):
    g = torch.Generator().manual_seed(seed)
    v = quantize(torch.randn(len(users) * S, D, generator=g).numpy())
    seq_q = torch.from_numpy(v.q).reshape(len(users), S, D)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(users)]), dtype=torch.long)
    cand = torch.randn(int(sum(users)), D, generator=g)
    return seq_q, v, offsets, cand


def test_deduplicated_scores_equal_the_per_candidate_copies():
    seq_q, v, offsets, cand = grouped()
    user, pos = group_positions(offsets)
    assert user.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3] and pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    fast = nn_scores(seq_q, v.scale, v.zero, offsets, cand)
    ref = nn_scores_reference(seq_q, v.scale, v.zero, user, cand)
    assert fast.shape == (9, 40)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 5, 12, 50])
def test_top_k_in_time_order_matches_the_definition_with_ties_and_padding(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (30, 12), generator=g).float()  # many ties
    valid = torch.rand(30, 12, generator=g) > 0.3
    valid[0] = False  # nothing valid
    valid[1] = True
    assert torch.equal(top_k_in_time_order(scores, valid, k), top_k_reference(scores, valid, k))


def test_fused_selection_equals_the_eager_one():
    seq_q, v, offsets, cand = grouped(seed=3)
    valid = torch.rand(seq_q.shape[0], seq_q.shape[1], generator=torch.Generator().manual_seed(1)) > 0.2
    eager = select_nearest(seq_q, v.scale, v.zero, offsets, cand, valid, 8)
    assert torch.equal(select_nearest_fused(seq_q, v.scale, v.zero, offsets, cand, valid, 8), eager)
    user, _ = group_positions(offsets)
    ref = top_k_reference(nn_scores_reference(seq_q, v.scale, v.zero, user, cand), valid[user], 8)
    assert torch.equal(eager, ref)
