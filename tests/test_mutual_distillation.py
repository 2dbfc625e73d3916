"""Mutual distillation between an ensemble's members (objectives/mutual_distillation.py) and its place in the
retrieval loss."""

import math

import numpy as np
import pytest
import torch

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.objectives.mutual_distillation import ensemble_distillation
from pinnerformer.objectives.sampled_softmax import LossConfig, SampledSoftmaxLoss
from pinnerformer.objectives.examples import ExampleBatch
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import RetrievalTask

INF = float("inf")


def test_ensemble_distillation_by_hand_with_masked_candidates():
    """Two members, three queries of two examples; masked candidates (-inf, the same in both) drop out of both the
    teacher and the members' distributions; each member's term is the mean over examples of its queries' mean KL."""
    z1 = torch.tensor([[2.0, 0.5, -INF, 1.0], [0.0, 1.0, 2.0, -INF], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 1.5, -INF, 0.0], [2.0, 0.0, 1.0, -INF], [0.0, 3.0, 1.0, 0.5]], dtype=torch.float64)
    q_example = torch.tensor([0, 0, 1])

    def softmax(row):
        kept = [x for x in row if x != -INF]
        total = sum(math.exp(x) for x in kept)
        return [math.exp(x) / total if x != -INF else 0.0 for x in row]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

    want = []
    for z in (z1, z2):
        per_query = []
        for i in range(3):
            mean = [(a + b) / 2 if a != -INF else -INF for a, b in zip(z1[i].tolist(), z2[i].tolist())]
            per_query.append(kl(softmax(mean), softmax(z[i].tolist())))
        want.append(((per_query[0] + per_query[1]) / 2 + per_query[2]) / 2)  # each example weighs the same
    got = ensemble_distillation([z1, z2], q_example, 2)
    for g, w in zip(got, want):
        assert abs(g.item() - w) < 1e-6
    # weighting=query: the flat mean over the three queries
    flat = ensemble_distillation([z1, z2], q_example, 2, weighting="query")
    for f, z in zip(flat, (z1, z2)):
        per_query = []
        for i in range(3):
            mean = [(a + b) / 2 if a != -INF else -INF for a, b in zip(z1[i].tolist(), z2[i].tolist())]
            per_query.append(kl(softmax(mean), softmax(z[i].tolist())))
        assert abs(f.item() - sum(per_query) / 3) < 1e-6
    # members that mask different candidates did not come from one batch
    other = z2.clone()
    other[1, 3] = 0.0
    with pytest.raises(ValueError, match="mask the same candidates"):
        ensemble_distillation([z1, other], q_example, 2)


def test_members_that_agree_have_a_zero_term_and_the_teacher_passes_no_gradient():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    base[:, 3] = -INF  # a masked column
    same = [base.clone().requires_grad_(), base.clone().requires_grad_(), base.clone().requires_grad_()]
    terms = ensemble_distillation(same, torch.arange(5), 5)
    assert all(abs(t.item()) < 1e-6 for t in terms)
    # shifting a row by a constant changes nothing (a softmax): still zero
    shifted = [base + 4.0, base, base - 1.0]
    assert all(abs(t.item()) < 1e-6 for t in ensemble_distillation(shifted, torch.arange(5), 5))
    # members that disagree: positive terms; member 0's term moves only member 0's logits, finitely
    z = [torch.randn(5, 7, generator=g).masked_fill(base == -INF, -INF).requires_grad_() for _ in range(3)]
    terms = ensemble_distillation(z, torch.arange(5), 5)
    assert all(t.item() > 1e-3 for t in terms)
    terms[0].backward()
    assert torch.isfinite(z[0].grad).all() and z[0].grad.abs().sum() > 0
    assert z[0].grad[:, 3].abs().sum() == 0  # masked candidates get no gradient
    assert all(z[k].grad is None or z[k].grad.abs().sum() == 0 for k in (1, 2))  # the teacher is held fixed
    with pytest.raises(ValueError, match="at least two members"):
        ensemble_distillation(z[:1], torch.arange(5), 5)


def test_the_loss_can_return_the_logits_it_normalises():
    """with_logits: the same loss as the plain call, and the logits it came from (column 0 the positive);
    refused where the loss has no such logits (the full softmax, the compiled loss, a distributed share)."""
    g = torch.Generator().manual_seed(1)
    n_items, B = 50, 3
    ex = ExampleBatch(users=np.arange(B), starts=np.zeros(B, np.int64), ends=np.full(B, 4, np.int64),
                      q_example=np.array([0, 0, 1, 2, 2]), q_position=np.array([0, 2, 1, 0, 3]),
                      q_item=np.array([4, 9, 4, 17, 30]), label_example=np.array([0, 0, 1, 2, 2]),
                      label_item=np.array([4, 9, 4, 17, 30]))
    loss = SampledSoftmaxLoss(LossConfig(n_random=16), n_items, seed=0)
    t = loss.host_inputs(ex, torch.Generator().manual_seed(0))
    t = {k: torch.as_tensor(v) for k, v in t.items()}
    table = torch.nn.functional.normalize(torch.randn(n_items, 8, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    tau = torch.tensor(0.1)
    q_plain, q_kept = q.clone().requires_grad_(), q.clone().requires_grad_()
    plain = loss(q_plain, lambda ids: table[ids], tau, t, B)
    value, logits = loss(q_kept, lambda ids: table[ids], tau, t, B, with_logits=True)
    assert torch.equal(value, plain)  # the same operations: exactly the same loss and gradient
    plain.backward()
    value.backward()
    assert torch.equal(q_plain.grad, q_kept.grad)
    logits = logits.detach()
    assert logits.shape == (5, 1 + len(t["pool_items"]))
    torch.testing.assert_close(logits[:, 0], (q * table[t["label_items"]]).sum(-1) / tau - t["pos_log_q"])
    # each query's example's positives in the pool are masked (-inf); the rest are finite
    positives = {0: [4, 9], 1: [4], 2: [17, 30]}
    own = torch.stack([torch.isin(t["pool_items"], torch.tensor(positives[e])) for e in [0, 0, 1, 2, 2]])
    assert own.any() and (logits[:, 1:][own] == -INF).all()
    assert torch.isfinite(logits[:, 1:][~own]).all() and torch.isfinite(logits[:, 0]).all()
    for cfg, fused in ((LossConfig(negatives="full"), False), (LossConfig(n_random=16), True)):
        other = SampledSoftmaxLoss(cfg, n_items, seed=0, fused=fused)
        t2 = {k: torch.as_tensor(v) for k, v in other.host_inputs(ex, torch.Generator().manual_seed(0)).items()}
        with pytest.raises(ValueError, match="eager loss in one process"):
            other(q, lambda ids: table[ids], tau, t2, B, with_logits=True)
    with pytest.raises(ValueError, match="eager loss in one process"):
        loss(q, lambda ids: table[ids], tau, t, B, queries=torch.arange(2), with_logits=True)


def config(**over):
    return load_config("small", overrides={**TINY, **over})


def test_the_ensemble_loss_adds_the_weighted_mutual_term(planted):
    """Members' losses plus weight × their mutual terms, averaged: linear in the weight, zero (to rounding) when
    the members are the same network (dropout off), logged with each step, and its gradient reaches the encoders."""
    ds = Dataset.open(planted)
    model = {**TINY["model"], "dropout": 0.0, "input_dropout": 0.0, "members": 3}
    plain = RetrievalTask(ds, config(model=model))
    half = RetrievalTask(ds, config(model=model, loss={**TINY["loss"], "distill_weight": 0.5}))
    whole = RetrievalTask(ds, config(model=model, loss={**TINY["loss"], "distill_weight": 1.0}))
    for task in (half, whole):
        task.model.load_state_dict(plain.model.state_dict())
    batch = plain.host_batch(0, 0)
    cpu = torch.device("cpu")
    base = plain.loss(batch, 0, cpu).loss
    with_half, with_whole = half.loss(batch, 0, cpu).loss, whole.loss(batch, 0, cpu).loss
    assert with_half > base + 1e-4  # three differently initialised members disagree
    assert set(whole.step_scalars()) == {"tau", "distill_kl"} and whole.step_scalars()["distill_kl"] > 1e-4
    assert set(plain.step_scalars()) == {"tau"}
    torch.testing.assert_close(with_whole - base, 2 * (with_half - base), atol=1e-5, rtol=1e-4)
    with_whole.backward()
    base.backward()
    g_d, g_p = whole.model.members[1].blocks[0].qkv.weight.grad, plain.model.members[1].blocks[0].qkv.weight.grad
    assert not torch.allclose(g_d, g_p, atol=1e-7)
    # three copies of one network: the ensemble's distribution is each member's, the term is exactly zero
    state = plain.model.members[0].state_dict()
    for task in (plain, whole):
        for member in task.model.members:
            member.load_state_dict(state)
    batch = plain.host_batch(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(whole.loss(batch, 1, cpu).loss, plain.loss(batch, 1, cpu).loss)


def test_distill_weight_is_refused_where_it_cannot_apply(planted):
    ds = Dataset.open(planted)
    with pytest.raises(PinnerformerError, match="set model.members to 2 or more"):
        RetrievalTask(ds, config(loss={**TINY["loss"], "distill_weight": 0.5}))
    with pytest.raises(PinnerformerError, match="not negatives=full"):
        RetrievalTask(ds, config(model={**TINY["model"], "members": 2},
                                 loss={**TINY["loss"], "distill_weight": 0.5, "negatives": "full"}))
    task = RetrievalTask(ds, config(model={**TINY["model"], "members": 2},
                                    loss={**TINY["loss"], "distill_weight": 0.5}))

    class TwoRanks:
        world = 2

    with pytest.raises(PinnerformerError, match="distill_weight is for one process"):
        task.distribute(TwoRanks())
    # compile keeps the eager loss (the mutual term reads its logits); the encoders are compiled as usual
    task.compile("default")
    assert task.objective.fused is None
