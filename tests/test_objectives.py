"""Loss against a float64 reference, logQ exactly as the formula says, the count-min sketch, example cutting."""

import math

import numpy as np
import pytest
import torch

from pinnerformer.data.timelines import Timelines
from pinnerformer.objectives.examples import ExampleConfig, ExampleSampler
from pinnerformer.objectives.sampled_softmax import (
    CountMinSketch, build_negative_pool, label_mask, log_q_of, own_positive_mask, own_positive_rows, sampled_softmax_loss,
    sampled_softmax_loss_fused,
)


def reference_loss(pos, neg, pos_lq, neg_lq, mask, q_example, n_examples):
    """Float64, loop by loop: L = -log(e^{s_p - logQ_p} / (e^{s_p - logQ_p} + Σ_n e^{s_n - logQ_n}))."""
    per_ex = [[] for _ in range(n_examples)]
    for q in range(len(pos)):
        zp = pos[q] - pos_lq[q]
        denom = math.exp(zp) + sum(math.exp(neg[q, n] - neg_lq[n]) for n in range(neg.shape[1]) if not mask[q, n])
        per_ex[q_example[q]].append(-(zp - math.log(denom)))
    return np.mean([np.mean(v) for v in per_ex if v])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("own", [True, False], ids=["own-positive-mask", "label-mask"])
def test_fused_loss_equals_the_reference_in_value_and_gradients(own, compiled):
    """The fused form (what `compile` trains with) against `sampled_softmax_loss` on the same embeddings, float64:
    value and every gradient (query, positive, pool, temperature) to rounding. Example 3 has all its pool masked
    (its own positives fill the pool): loss 0 and zero gradients there, no NaN."""
    g = torch.Generator().manual_seed(3)
    Q, N, D, B, I = 40, 30, 8, 5, 50
    q_example = torch.sort(torch.randint(0, B, (Q,), generator=g)).values
    pool = torch.randint(0, I, (N,), generator=g)
    q_item = torch.randint(0, I, (Q,), generator=g)
    label_example = torch.cat([torch.randint(0, B, (25,), generator=g), torch.full((N,), 3)])
    label_item = torch.cat([torch.randint(0, I, (25,), generator=g), pool])  # example 3: every pool item
    pos_lq, neg_lq = torch.randn(Q, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    def leaves():
        gg = torch.Generator().manual_seed(4)
        unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gg, dtype=torch.float64), dim=-1)
        return [unit(Q, D).requires_grad_(), unit(Q, D).requires_grad_(), unit(N, D).requires_grad_(),
                torch.tensor(0.05, dtype=torch.float64, requires_grad=True)]

    ref_in, fused_in = leaves(), leaves()
    q, pe, ne, tau = ref_in
    mask = own_positive_mask(q_example, pool, label_example, label_item, B, I) if own else label_mask(q_item, pool)
    want = sampled_softmax_loss((q * pe).sum(-1) / tau, q @ ne.T / tau, pos_lq, neg_lq, mask, q_example, B)
    fn = torch.compile(sampled_softmax_loss_fused, dynamic=True) if compiled else sampled_softmax_loss_fused
    rows = own_positive_rows(pool, label_example, label_item, B, I) if own else None
    got = fn(*fused_in, pos_lq, neg_lq, q_example, B, own_rows=rows, q_item=None if own else q_item,
             pool_items=None if own else pool)
    want.backward()
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(ref_in, fused_in):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)
    if own:  # the fully masked example adds nothing to the gradient of its queries
        assert mask[q_example == 3].all() and (q_example == 3).any()
        assert torch.all(fused_in[0].grad[q_example == 3] == 0)


@pytest.mark.parametrize("n_pool", [0, 5], ids=["empty-pool", "random-pool"])
def test_a_batch_without_queries_has_loss_zero_not_nan(n_pool):
    """No query in a batch (every sampled window empty; with in-batch negatives the pool is then empty too): both
    forms of the loss give 0 with zero gradients, never NaN, so one such batch cannot poison a run."""
    q, pe = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4, requires_grad=True)
    ne = torch.randn(n_pool, 4, requires_grad=True)
    tau = torch.tensor(0.1, requires_grad=True)
    ex = torch.zeros(0, dtype=torch.long)
    ref = sampled_softmax_loss((q * pe).sum(-1) / tau, q @ ne.T / tau, torch.zeros(0), torch.zeros(n_pool),
                               torch.zeros(0, n_pool, dtype=torch.bool), ex, 3)
    fused = sampled_softmax_loss_fused(q, pe, ne, tau, torch.zeros(0), torch.zeros(n_pool), ex, 3,
                                       own_rows=torch.zeros(3, n_pool, dtype=torch.bool))
    for loss in (ref, fused):
        assert loss.item() == 0.0
        loss.backward()
    assert tau.grad.item() == 0.0 and (ne.grad == 0).all()


def test_loss_equals_float64_reference():
    g = torch.Generator().manual_seed(0)
    Q, N, B = 23, 17, 5
    pos = torch.randn(Q, generator=g) * 3
    neg = torch.randn(Q, N, generator=g) * 3
    pos_lq = torch.randn(Q, generator=g)
    neg_lq = torch.randn(N, generator=g)
    mask = torch.rand(Q, N, generator=g) < 0.2
    q_example = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4])
    got = sampled_softmax_loss(pos, neg, pos_lq, neg_lq, mask, q_example, B)
    want = reference_loss(pos.double().numpy(), neg.double().numpy(), pos_lq.double().numpy(),
                          neg_lq.double().numpy(), mask.numpy(), q_example.numpy(), B)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # each user weighs equally: example 2 has 12 queries, example 0 three, yet both count once
    per_query = [reference_loss(pos[i:i + 1].double().numpy(), neg[i:i + 1].double().numpy(),
                                pos_lq[i:i + 1].double().numpy(), neg_lq.double().numpy(), mask[i:i + 1].numpy(),
                                [0], 1) for i in range(Q)]
    assert want != pytest.approx(np.mean(per_query), rel=1e-3)


def test_logq_changes_loss_exactly_as_the_formula_says():
    # one query, positive score 2, negatives scores [1, 0.5]; Q = [0.5 | 2, 0.25]
    pos, neg = torch.tensor([2.0]), torch.tensor([[1.0, 0.5]])
    no_mask, ex = torch.zeros(1, 2, dtype=torch.bool), torch.tensor([0])
    plain = sampled_softmax_loss(pos, neg, torch.zeros(1), torch.zeros(2), no_mask, ex, 1).item()
    assert plain == pytest.approx(-2 + math.log(math.e ** 2 + math.e + math.e ** 0.5), rel=1e-6)
    lq_p, lq_n = math.log(0.5), [math.log(2.0), math.log(0.25)]
    corrected = sampled_softmax_loss(pos, neg, torch.tensor([lq_p]), torch.tensor(lq_n), no_mask, ex, 1).item()
    zp = 2 - lq_p
    assert corrected == pytest.approx(-zp + math.log(math.exp(zp) + math.exp(1 - lq_n[0]) + math.exp(0.5 - lq_n[1])),
                                      rel=1e-6)
    # masking a negative removes exactly its term
    masked = sampled_softmax_loss(pos, neg, torch.zeros(1), torch.zeros(2), torch.tensor([[True, False]]), ex, 1)
    assert masked.item() == pytest.approx(-2 + math.log(math.e ** 2 + math.e ** 0.5), rel=1e-6)


def test_count_min_sketch_counts_and_frequencies():
    cms = CountMinSketch(width=1 << 12, depth=4, seed=1)
    items = torch.tensor([5] * 50 + [7] * 30 + list(range(100, 120)))
    cms.update(items)
    assert cms.total == 100
    est = cms.count(torch.tensor([5, 7, 100, 999]))
    assert est[0] >= 50 and est[1] >= 30 and est[2] >= 1  # never under-counts
    assert est.tolist() == [50, 30, 1, 0]  # 22 keys in 4096 cells: no collisions with this seed
    assert cms.frequency(torch.tensor([5])).item() == pytest.approx(0.5)
    tiny = CountMinSketch(width=4, depth=2, seed=0)
    tiny.update(torch.arange(100))
    assert (tiny.count(torch.arange(100)) >= 1).all()  # over-estimates under collisions, never under
    restored = CountMinSketch(width=1 << 12, depth=4, seed=9)
    restored.load_state_dict(cms.state_dict())
    assert torch.equal(restored.count(torch.arange(200)), cms.count(torch.arange(200)))


def test_negative_pools_and_their_log_q():
    cms = CountMinSketch(width=1 << 12, seed=0)
    labels = torch.tensor([3, 3, 3, 8])
    cms.update(labels)
    g = torch.Generator().manual_seed(0)
    ib = build_negative_pool(labels, "in-batch", 16, 100, cms, True, g)
    assert torch.equal(ib.items, labels)
    assert torch.allclose(ib.log_q, torch.log(torch.tensor([3.0, 3.0, 3.0, 1.0])))  # N_b · f(x) = 4 · count/4
    rnd = build_negative_pool(labels, "random", 16, 100, cms, True, g)
    assert len(rnd.items) == 16 and torch.allclose(rnd.log_q, torch.full((16,), math.log(16 / 100)))
    mixed = build_negative_pool(labels, "mixed", 16, 100, cms, True, g)
    assert len(mixed.items) == 20
    assert mixed.log_q[0].item() == pytest.approx(math.log(3 + 0.16), rel=1e-6)
    assert torch.equal(log_q_of(torch.tensor([3]), "mixed", 4, 16, 100, cms), mixed.log_q[:1])
    off = build_negative_pool(labels, "mixed", 16, 100, cms, False, g)
    assert (off.log_q == 0).all()


def test_own_positives_are_masked():
    pool = torch.tensor([4, 5, 6, 4])
    label_example, label_item = torch.tensor([0, 0, 1]), torch.tensor([4, 6, 5])
    mask = own_positive_mask(torch.tensor([0, 1, 1]), pool, label_example, label_item, 2, 10)
    assert mask.tolist() == [[True, False, True, True], [False, True, False, False], [False, True, False, False]]


def toy_timeline(clock="seconds"):
    # one user, 10 events 1 day apart; positives (action 1) at indices 2, 5, 6, 9
    action = np.array([0, 0, 1, 0, 0, 1, 1, 0, 0, 1], dtype=np.int16)
    ts = (np.arange(10) * 86400 if clock == "seconds" else np.arange(10)).astype(np.int64)
    return Timelines(offsets=np.array([0, 10]), item=np.arange(100, 110, dtype=np.int32), action=action, ts=ts,
                     surface=np.full(10, -1, np.int16), duration=np.full(10, np.nan, np.float32), clock=clock)


@pytest.mark.parametrize("objective", ["next-action", "sasrec", "all-action", "dense-all-action"])
def test_labels_follow_their_definition(objective):
    tl = toy_timeline()
    day = 86400.0
    s = ExampleSampler(tl, np.array([1]), tl.full(), ExampleConfig(max_len=4, positions=3, window_days=2.5,
                                                                     max_labels=32), objective)
    assert s.eligible.tolist() == [0] and (s.lo[0], s.hi[0]) == (1, 9)
    pos_items = {102, 105, 106, 109}
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = s.sample(np.array([0]), rng)
        c, start = int(b.ends[0]), int(b.starts[0])
        assert 1 <= c <= 9 and start == max(0, c - 4)
        for p, it in zip(b.q_position, b.q_item):
            i = start + int(p)  # the query's event index
            assert it in pos_items and it - 100 > i  # a positive strictly after the position
            if objective == "next-action":
                assert i == c - 1 and it - 100 == min(j for j in (2, 5, 6, 9) if j >= c)
            if objective == "sasrec":
                assert it - 100 == min(j for j in (2, 5, 6, 9) if j > i)
            if objective in ("all-action", "dense-all-action"):
                assert (it - 100 - i) * day <= 2.5 * day  # inside the K-day window after that position
            if objective == "all-action":
                assert i == c - 1
        if objective == "all-action":
            want = {100 + j for j in (2, 5, 6, 9) if c <= j <= c - 1 + 2}
            assert set(b.q_item.tolist()) == want
        if objective == "dense-all-action":
            assert len(set(b.q_position.tolist())) == len(b.q_position) <= 3


def test_dense_sampling_is_uniform_and_keeps_examples_apart():
    """The batched dense-all-action sampler: a batch mixing two users keeps each query with its own example and
    user; positions are distinct, each of the n input slots drawn with probability positions/n; a position's label
    is uniform over the positives in its window."""
    day = 86400
    # user 0: the toy timeline (items 100..109); user 1: 30 events a day apart, every one positive (items 200..229)
    action = np.concatenate([[0, 0, 1, 0, 0, 1, 1, 0, 0, 1], np.ones(30)]).astype(np.int16)
    ts = np.concatenate([np.arange(10), np.arange(30)]).astype(np.int64) * day
    tl = Timelines(offsets=np.array([0, 10, 40]), item=np.concatenate([np.arange(100, 110), np.arange(200, 230)]
                                                                      ).astype(np.int32),
                   action=action, ts=ts, surface=np.full(40, -1, np.int16), duration=np.full(40, np.nan, np.float32),
                   clock="seconds")
    cfg = ExampleConfig(max_len=8, positions=3, window_days=2.5, cutoff="last")
    smp = ExampleSampler(tl, np.array([1]), tl.full(), cfg, "dense-all-action")
    rng = np.random.default_rng(0)
    slots, label_step = np.zeros(8), np.zeros(3)
    n = 3000
    for _ in range(n):
        b = smp.sample(np.array([0, 1, 0]), rng)
        assert b.ends.tolist() == [9, 39, 9] and b.starts.tolist() == [1, 31, 1]
        user_of_query = np.array([0, 1, 0])[b.q_example]
        assert np.all((b.q_item >= 200) == (user_of_query == 1))
        one = b.q_example == 1  # user 1: every position has two positives in its window, so exactly 3 queries
        assert one.sum() == 3 and len(set(b.q_position[one].tolist())) == 3
        assert np.all(np.diff(b.q_position[one]) > 0)
        slots[b.q_position[one]] += 1
        step = (b.q_item[one] - 190) - (b.starts[1] + b.q_position[one])  # label - position (global)
        last = b.q_position[one] == 7  # the newest position's window holds one positive (the range ends), others two
        assert np.all(step[last] == 1)
        np.add.at(label_step, step[~last], 1)
    np.testing.assert_allclose(slots / n, 3 / 8, atol=0.04)  # each slot with probability positions / n
    assert label_step[0] == 0 and abs(label_step[1] / label_step.sum() - 0.5) < 0.03


def test_sampling_no_users_gives_an_empty_batch():
    tl = toy_timeline()
    for objective in ("dense-all-action", "all-action", "sasrec", "next-action"):
        smp = ExampleSampler(tl, np.array([1]), tl.full(), ExampleConfig(max_len=4), objective)
        b = smp.sample(np.zeros(0, np.int64), np.random.default_rng(0))
        assert len(b.starts) == len(b.q_item) == len(b.label_item) == 0 and b.q_position.dtype == np.int64


def test_order_clock_window_counts_actions():
    tl = toy_timeline(clock="order")
    s = ExampleSampler(tl, np.array([1]), tl.full(), ExampleConfig(max_len=4, window_actions=1), "all-action")
    assert s.window_in_actions  # an order-only clock counts the window in actions
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = s.sample(np.array([0]), rng)
        c = int(b.ends[0])
        assert set(b.q_item.tolist()) <= {100 + c} and set(b.q_item.tolist()) == ({100 + c} & {102, 105, 106, 109})


def test_label_ranks_ties_pessimistic_and_other_labels_excluded():
    from pinnerformer.evaluation.metrics import hit_rate_at_k, label_ranks, ndcg_at_k, recall_at_k

    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1, 0.7],
                           [0.1, 0.2, 0.3, 0.4, 0.5]])
    ranks = label_ranks(scores, [np.array([1, 4]), np.array([0])])
    # item 1 (0.5): items 0 (0.9) and 2 (0.5, a tie: counted above) beat it; item 4 is another label: ignored
    # item 4 (0.7): only item 0 beats it. User 2's label is last of 5.
    assert [r.tolist() for r in ranks] == [[2, 1], [4]]
    assert recall_at_k(ranks, 2).tolist() == [0.5, 0.0]
    assert hit_rate_at_k(ranks, 2).tolist() == [1.0, 0.0]
    assert ndcg_at_k(ranks, 5).tolist() == pytest.approx([1 / np.log2(3), 1 / np.log2(6)])
    empty = label_ranks(scores[:1], [np.array([], dtype=np.int64)])
    assert np.isnan(recall_at_k(empty, 10)[0])


def test_interest_entropy_coverage_and_bootstrap():
    from pinnerformer.evaluation.metrics import bootstrap_ci, interest_entropy, p90_coverage

    interests = [["a"], ["a"], ["b"], ["a", "b"], []]
    ent = interest_entropy(np.array([[0, 1], [0, 2], [3, 4], [4, 4]]), interests)
    # user 0: all "a" -> 0; user 1: a,b evenly -> ln 2; user 2: item 3 splits a/b, item 4 adds nothing -> ln 2
    assert ent[:3].tolist() == pytest.approx([0.0, np.log(2), np.log(2)]) and np.isnan(ent[3])
    # 10 users' top-2 lists: item 0 fills 10 slots, item 1 eight, items 2 and 3 one each (20 slots)
    top = np.array([[0, 1]] * 8 + [[0, 2], [0, 3]])
    # 90% of 20 slots = 18 = items 0 and 1 -> 2 items of an index of 10
    assert p90_coverage(top, 10) == pytest.approx(0.2)
    assert p90_coverage(np.arange(20).reshape(10, 2), 20) == pytest.approx(18 / 20)
    lo, hi = bootstrap_ci(np.array([0.0, 1.0] * 50 + [np.nan]))
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def test_full_softmax_is_cross_entropy_over_the_catalogue():
    """negatives="full": the pool is every item once, Q = 1, so the loss is plain cross-entropy."""
    from pinnerformer.objectives.sampled_softmax import label_mask

    cms = CountMinSketch(width=1 << 8, seed=0)
    labels = torch.tensor([1, 3, 3])  # three queries; queries 0 and 1 belong to example 0, query 2 to example 1
    cms.update(labels)
    pool = build_negative_pool(labels, "full", 999, 4, cms, True, torch.Generator().manual_seed(0))
    assert pool.items.tolist() == [0, 1, 2, 3] and (pool.log_q == 0).all()
    assert (log_q_of(labels, "full", 3, 999, 4, cms) == 0).all()
    scores = torch.tensor([[0.0, 2.0, 1.0, -1.0], [0.5, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    pos = scores[torch.arange(3), labels]
    q_example = torch.tensor([0, 0, 1])
    # only each query's own label masked: hand-computed cross-entropy, example 0 averaged over its two queries
    ce = [-2 + math.log(1 + math.e ** 2 + math.e + math.e ** -1),
          -3 + math.log(math.e ** 0.5 + 2 + math.e ** 3),
          -1 + math.log(4 * math.e)]
    got = sampled_softmax_loss(pos, scores, torch.zeros(3), pool.log_q, label_mask(labels, pool.items), q_example, 2)
    assert got.item() == pytest.approx(((ce[0] + ce[1]) / 2 + ce[2]) / 2, rel=1e-6)
    per_query = torch.nn.functional.cross_entropy(scores, labels, reduction="none")
    assert per_query.tolist() == pytest.approx(ce, rel=1e-6)
    # masking the example's other positives removes item 3 from query 0's softmax and item 1 from query 1's
    own = own_positive_mask(q_example, pool.items, torch.tensor([0, 0, 1]), torch.tensor([1, 3, 3]), 2, 4)
    got = sampled_softmax_loss(pos, scores, torch.zeros(3), pool.log_q, own, q_example, 2)
    ce_own = [-2 + math.log(1 + math.e ** 2 + math.e), -3 + math.log(math.e ** 0.5 + 1 + math.e ** 3), ce[2]]
    assert got.item() == pytest.approx(((ce_own[0] + ce_own[1]) / 2 + ce_own[2]) / 2, rel=1e-6)


def test_last_cutoff_takes_the_whole_training_sequence():
    tl = toy_timeline()
    view = tl.drop_last(2)  # events 0..7 train: the last positive inside is event 6
    s = ExampleSampler(tl, np.array([1]), view, ExampleConfig(max_len=4, cutoff="last"), "sasrec")
    b = s.sample(np.array([0]), np.random.default_rng(0))
    assert (int(b.starts[0]), int(b.ends[0])) == (2, 6)  # the last M actions before the last training positive
    assert b.q_item.tolist() == [105, 105, 105, 106]  # every position -> the next positive, never past event 7
    with pytest.raises(ValueError, match=r"cutoff\s+Input should be 'random' or 'last'"):
        ExampleSampler(tl, np.array([1]), view, ExampleConfig(cutoff="first"))
    with pytest.raises(ValueError, match="unknown objective 'sasrecc'"):
        ExampleSampler(tl, np.array([1]), view, ExampleConfig(), "sasrecc")


@pytest.mark.parametrize("masked", [False, True])
def test_fused_full_softmax_equals_the_sampled_loss_with_the_full_pool(masked):
    from pinnerformer.objectives.sampled_softmax import full_softmax_loss, label_mask

    g = torch.Generator().manual_seed(1)
    Q, I, B = 19, 11, 4
    logits = torch.randn(Q, I, generator=g) * 2
    target = torch.randint(0, I, (Q,), generator=g)
    q_example = torch.sort(torch.randint(0, B, (Q,), generator=g)).values
    own = torch.rand(Q, I, generator=g) < 0.3 if masked else label_mask(target, torch.arange(I))
    want = sampled_softmax_loss(logits[torch.arange(Q), target], logits, torch.zeros(Q), torch.zeros(I),
                                own | label_mask(target, torch.arange(I)), q_example, B)
    got = full_softmax_loss(logits, target, own if masked else None, q_example, B)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_query_weighting_is_the_flat_mean_in_every_form_of_the_loss():
    """weighting="query" (SASRec's mean over positions): the float64 reference's per-query losses averaged flat,
    in the plain, fused and full-softmax forms; and a distributed rank's share (its queries, the whole batch's
    query count as denominator) adds up to the whole batch's loss."""
    from pinnerformer.objectives.sampled_softmax import full_softmax_loss, reduce_queries

    g = torch.Generator().manual_seed(5)
    Q, N, B = 23, 17, 5
    pos, neg = torch.randn(Q, generator=g, dtype=torch.float64) * 3, torch.randn(Q, N, generator=g, dtype=torch.float64) * 3
    pos_lq, neg_lq = torch.randn(Q, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    mask = torch.rand(Q, N, generator=g) < 0.2
    q_example = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4])
    per_query = [reference_loss(pos[i:i + 1].numpy(), neg[i:i + 1].numpy(), pos_lq[i:i + 1].numpy(), neg_lq.numpy(),
                                mask[i:i + 1].numpy(), [0], 1) for i in range(Q)]
    got = sampled_softmax_loss(pos, neg, pos_lq, neg_lq, mask, q_example, B, weighting="query")
    assert got.item() == pytest.approx(np.mean(per_query), rel=1e-12)
    by_example = sampled_softmax_loss(pos, neg, pos_lq, neg_lq, mask, q_example, B)
    assert got.item() != pytest.approx(by_example.item(), rel=1e-3)  # the two weightings differ on this batch
    # one rank's share: its queries' losses over the whole batch's query count; the two shares add up
    halves = [slice(0, 9), slice(9, Q)]
    shares = [sampled_softmax_loss(pos[h], neg[h], pos_lq[h], neg_lq, mask[h], q_example[h], B, Q, "query")
              for h in halves]
    assert sum(s.item() for s in shares) == pytest.approx(got.item(), rel=1e-12)
    # the fused form from embeddings, and the full softmax's cross-entropy
    q = torch.nn.functional.normalize(torch.randn(Q, 6, generator=g, dtype=torch.float64), dim=-1)
    pe = torch.nn.functional.normalize(torch.randn(Q, 6, generator=g, dtype=torch.float64), dim=-1)
    ne = torch.nn.functional.normalize(torch.randn(N, 6, generator=g, dtype=torch.float64), dim=-1)
    q_item, pool = torch.randint(100, 200, (Q,), generator=g), torch.randint(0, 100, (N,), generator=g)
    tau = torch.tensor(0.1, dtype=torch.float64)
    want = sampled_softmax_loss((q * pe).sum(-1) / tau, q @ ne.T / tau, pos_lq, neg_lq, label_mask(q_item, pool),
                                q_example, B, weighting="query")
    fused = sampled_softmax_loss_fused(q, pe, ne, tau, pos_lq, neg_lq, q_example, B, q_item=q_item, pool_items=pool,
                                       weighting="query")
    assert fused.item() == pytest.approx(want.item(), rel=1e-12)
    logits, target = torch.randn(Q, 11, generator=g, dtype=torch.float64), torch.randint(0, 11, (Q,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert full_softmax_loss(logits, target, None, q_example, B, "query").item() == pytest.approx(ce.mean().item())
    assert reduce_queries(ce, q_example, B, "example").item() == pytest.approx(
        np.mean([ce[q_example == b].mean().item() for b in (0, 1, 2, 4)]))


def test_crops_are_windows_inside_the_example_with_the_same_labels():
    """data.crop=1: every example's input is a contiguous run of its window of at least crop_min of its actions,
    at every offset and length over many draws; each position's label is still the next positive (sasrec), never
    past the training range. crop=0 is the whole window."""
    tl = Timelines(offsets=np.array([0, 20]), item=np.arange(100, 120, dtype=np.int32),
                   action=np.ones(20, dtype=np.int16), ts=np.arange(20, dtype=np.int64),
                   surface=np.full(20, -1, np.int16), duration=np.full(20, np.nan, np.float32), clock="order")
    view = tl.drop_last(2)  # training range: events 0..17; the last cut-off c = 17
    whole = ExampleSampler(tl, np.array([1]), view, ExampleConfig(max_len=12, cutoff="last"), "sasrec")
    b = whole.sample(np.array([0]), np.random.default_rng(0))
    assert (int(b.starts[0]), int(b.ends[0])) == (5, 17)
    cropped = ExampleSampler(tl, np.array([1]), view, ExampleConfig(max_len=12, cutoff="last", crop=1.0,
                                                                  crop_min=0.5), "sasrec")
    seen = set()
    for seed in range(300):
        b = cropped.sample(np.array([0, 0, 0]), np.random.default_rng(seed))
        for e in range(3):
            s, c = int(b.starts[e]), int(b.ends[e])
            assert 5 <= s < c <= 17 and c - s >= 6  # inside the window, at least half of its 12 actions
            seen.add((s, c))
            mine = b.q_example == e
            assert b.q_position[mine].tolist() == list(range(c - s))  # every position of the crop is a query
            assert b.q_item[mine].tolist() == list(range(101 + s, 101 + c))  # the next action, inside 0..17
    # every (offset, length) with length 6..12 inside the 12-action window: 7 + 6 + ... + 1 = 28 crops
    assert len(seen) == 28


def test_the_listwise_loss_is_each_requests_softmax_against_its_spread_labels():
    """objectives/request_softmax.py against a plain loop over (request, head) pairs; pairs with nothing to order (no
    positive, or only positives) do not count; a batch without any pair gives 0 with a graph."""
    from pinnerformer.objectives.request_softmax import request_softmax

    g = torch.Generator().manual_seed(0)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    logits = torch.randn(10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0], [0, 1], [1, 1], [0, 0], [0, 1], [0, 0], [1, 0]],
                          dtype=torch.float64)
    terms = []
    for r in range(4):
        rows = group == r
        for h in range(2):
            y = labels[rows, h]
            if 0 < y.sum() < len(y):
                terms.append(-(y / y.sum() * torch.log_softmax(logits[rows, h], 0)).sum())
    want = torch.stack(terms).mean()
    assert len(terms) == 5  # request 1 head 0 (no positive) and request 3 (one row) do not count
    got = request_softmax(logits, labels, group)
    torch.testing.assert_close(got.double(), want)
    grad_got, = torch.autograd.grad(got, logits)
    grad_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=1e-5, atol=1e-6)
    nothing = request_softmax(logits, torch.zeros_like(labels), group)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_listwise_batches_hold_whole_requests_each_row_once_per_epoch():
    from pinnerformer.errors import PinnerformerError
    from pinnerformer.training.ranking import whole_requests

    sizes = np.random.default_rng(0).integers(1, 9, 200)
    row_request = np.repeat(np.arange(200), sizes)
    rows = np.flatnonzero(row_request % 7 != 3)  # training rows: some requests are not training ones
    b = whole_requests(5, 2, rows, row_request, 20)
    n = len(rows) // 20
    assert len(b.start) == n + 1 and b.start[0] == 0
    taken = np.concatenate([b.rows[b.start[k]:b.start[k + 1]] for k in range(n)])
    assert len(np.unique(taken)) == len(taken) and set(taken) <= set(rows)  # each row at most once
    assert len(rows) - len(taken) < 20 + 8  # only the last, partial batch is left out
    for k in range(n):
        batch = b.rows[b.start[k]:b.start[k + 1]]
        assert 0 < len(batch) < 20 + 8
        for r in np.unique(row_request[batch]):  # whole: every training row of the request is in the batch
            assert set(batch[row_request[batch] == r]) == set(rows[row_request[rows] == r])
    again = whole_requests(5, 2, rows, row_request, 20)
    assert np.array_equal(again.rows, b.rows) and not np.array_equal(whole_requests(5, 3, rows, row_request, 20).rows,
                                                                     b.rows)
    with pytest.raises(PinnerformerError, match="more than optim.batch_size 4"):
        whole_requests(0, 0, rows, row_request, 4)
