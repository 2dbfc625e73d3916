"""Every fast op against its plain reference: int8 vectors (round trip within half a step), nearest-neighbour scores
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
from pinnerformer.ops.quantize import Int8Vectors, dequantize_normalize, quantize


def test_int8_round_trip_is_within_half_a_step_and_uses_the_whole_range():
    x = np.random.default_rng(0).normal(0, 0.3, (500, 64)).astype(np.float32)
    v = quantize(x)
    assert v.q.dtype == np.int8 and v.q.min() == -128 and v.q.max() == 127
    assert np.abs(v.dequantize() - x).max() <= v.max_error * (1 + 1e-4)
    unit = dequantize_normalize(torch.from_numpy(v.q), v.scale, v.zero)
    ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(500), atol=1e-5)
    assert (unit * ref).sum(-1).min() > 0.999  # the direction survives quantisation
    with pytest.raises(PinnerformerError, match="not a positive finite scale"):
        Int8Vectors(v.q, 0.0, v.zero)
    with pytest.raises(PinnerformerError, match="expected a \\[N, D\\] int8 array, found float32"):
        Int8Vectors(x, v.scale, v.zero)
    with pytest.raises(PinnerformerError, match="finite values"):
        quantize(np.array([[np.nan, 1.0]]))


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
