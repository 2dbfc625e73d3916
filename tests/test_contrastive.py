"""The twin-view contrastive regulariser (objectives/contrastive.py) and its place in the retrieval loss."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.objectives.contrastive import newest_query_rows, twin_view_info_nce
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import RetrievalBatch, RetrievalTask


def test_newest_query_rows_picks_each_examples_largest_position():
    q_example = np.array([1, 0, 0, 3, 1, 0, 3])  # example 2 has no query (no positive in any of its windows)
    q_position = np.array([0, 3, 1, 5, 2, 0, 4])
    assert newest_query_rows(q_example, q_position).tolist() == [1, 4, 3]
    assert newest_query_rows(np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []


def test_twin_view_info_nce_by_hand_and_same_target_pairs_left_out():
    g = torch.Generator().manual_seed(0)
    z1, z2 = F.normalize(torch.randn(4, 6, generator=g), dim=-1), F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    target = torch.tensor([7, 3, 7, 9])  # rows 0 and 2 share a next item
    tau = 0.2

    def ce(a, b, i):
        logits = [a[i] @ b[j] / tau for j in range(4) if j == i or target[j] != target[i]]
        own = a[i] @ b[i] / tau
        return -(own - torch.logsumexp(torch.stack(logits), 0))

    by_hand = 0.5 * (sum(ce(z1, z2, i) for i in range(4)) + sum(ce(z2, z1, i) for i in range(4))) / 4
    torch.testing.assert_close(twin_view_info_nce(z1, z2, target, tau), by_hand, atol=1e-6, rtol=0)
    # twins that match exactly, far from every other row, cost almost nothing; swapped twins cost a lot
    e = torch.eye(4, 6)
    assert twin_view_info_nce(e, e, torch.arange(4), 0.05) < 1e-6
    assert twin_view_info_nce(e, e[[1, 0, 3, 2]], torch.arange(4), 0.05) > 10
    # all targets equal: each row's only logit is its twin's, so the loss is exactly zero
    assert twin_view_info_nce(z1, z2, torch.zeros(4, dtype=torch.long), tau) == 0


def config(**over):
    return load_config("small", overrides={**TINY, **over})


def test_the_retrieval_loss_adds_the_weighted_twin_view_term(planted):
    """Without dropout the second view equals the first, so the step's loss is the plain loss plus weight × the
    InfoNCE of identical views, exactly; with dropout the second pass differs and the term is larger."""
    ds = Dataset.open(planted)
    model = {**TINY["model"], "dropout": 0.0, "input_dropout": 0.0}
    plain = RetrievalTask(ds, config(model=model))
    with_cl = RetrievalTask(ds, config(model=model, loss={**TINY["loss"], "contrastive_weight": 0.5,
                                                          "contrastive_temperature": 0.1}))
    with_cl.model.load_state_dict(plain.model.state_dict())
    batch = plain.host_batch(0, 0)
    cpu = torch.device("cpu")
    base, total = plain.loss(batch, 0, cpu).loss, with_cl.loss(batch, 0, cpu).loss
    ex = batch.examples

    def twin_term(ex):
        rows = newest_query_rows(ex.q_example, ex.q_position)
        z = plain.model.encode_sequence({k: torch.as_tensor(v) for k, v in batch.seq.items()})[
            torch.as_tensor(ex.q_example[rows]), torch.as_tensor(ex.q_position[rows])]
        return twin_view_info_nce(z, z, torch.as_tensor(ex.q_item[rows]), 0.1)

    term = twin_term(ex)
    assert term > 0.1 * math.log(2)  # a real term: the batch's other rows are competing negatives
    torch.testing.assert_close(total, base + 0.5 * term, atol=1e-5, rtol=1e-5)
    # an example without any query (possible under the dense objectives) is left out of the term, not an error
    keep = ex.q_example != ex.q_example[0]
    fewer = RetrievalBatch(dataclasses.replace(ex, q_example=ex.q_example[keep], q_position=ex.q_position[keep],
                                               q_item=ex.q_item[keep]), batch.seq)
    with torch.no_grad():
        base_f, total_f = plain.loss(fewer, 0, cpu).loss, with_cl.loss(fewer, 0, cpu).loss
    torch.testing.assert_close(total_f, base_f + 0.5 * twin_term(fewer.examples), atol=1e-5, rtol=1e-5)
    # the term's gradient reaches the encoder: the weights' gradients differ from the plain loss's
    total.backward()
    base.backward()
    g_cl, g_plain = with_cl.model.blocks[0].qkv.weight.grad, plain.model.blocks[0].qkv.weight.grad
    assert not torch.allclose(g_cl, g_plain, atol=1e-6)


def test_contrastive_weight_is_refused_in_distributed_runs(planted):
    task = RetrievalTask(Dataset.open(planted), config(loss={**TINY["loss"], "contrastive_weight": 0.1}))

    class TwoRanks:
        world = 2

    with pytest.raises(PinnerformerError, match="contrastive_weight is for one process"):
        task.distribute(TwoRanks())
