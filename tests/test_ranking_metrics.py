"""The ranker's building blocks against hand computations: HIT@3 (ties pessimistic, negative heads), AUC with ties,
grouped AUC, paired lifts; DCN v2's cross layer against its formula; the multi-task loss and its label weights;
heads as text."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pinnerformer.data.requests import parse_heads
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation import ranking_metrics as rm
from pinnerformer.models.ranker import CrossNetwork
from pinnerformer.objectives.multitask_bce import (
    MultiTaskLossConfig, head_weights, label_weight_matrix, multitask_bce, user_row_weights,
)


def test_hit_at_3_counts_engaged_items_in_the_top_3_per_request_with_ties_pessimistic():
    # request 0: 5 candidates, engaged {0, 3}; scores rank 3 first, 0 fourth -> 1 in the top 3
    # request 1: no engaged candidate -> not counted (NaN)
    # request 2: all scores equal, engaged {1}: pessimistic -> the engaged item is ranked last -> 0
    # request 3: 3 candidates, 2 engaged: both in the top 3 whatever the scores -> 2
    scores = np.array([0.2, 0.9, 0.8, 0.95, 0.1, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 0.5])
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 1])
    starts = np.array([0, 5, 7, 11, 14])
    hits = rm.hit_at_k(scores, labels, starts, k=3)
    assert np.isnan(hits[1])
    assert hits[[0, 2, 3]].tolist() == [1.0, 0.0, 2.0]
    # a negative head (lower is better): among ties the engaged item comes first, so a constant score counts it
    neg = rm.hit_at_k(scores, labels, starts, k=3, negative=True)
    assert neg[2] == 1.0 and neg[0] == 1.0
    # the shuffle seed cannot change a count: ties are broken by the label first
    assert np.array_equal(np.nan_to_num(rm.hit_at_k(scores, labels, starts, seed=7)), np.nan_to_num(hits))


def test_auc_with_ties_and_grouped_auc_weighted_by_candidates():
    # positives {0.9, 0.5}, negatives {0.5, 0.1}: pairs (0.9>0.5)=1 (0.9>0.1)=1 (0.5=0.5)=0.5 (0.5>0.1)=1 -> 3.5/4
    assert rm.weighted_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)
    assert np.isnan(rm.weighted_auc(np.array([0.3, 0.2]), np.array([1, 1])))
    # weights: the second negative counted twice: pairs vs 0.5 (w1) and 0.1 (w2): (1*1 + 1*2 + 0.5*1 + 1*2) / (2*3)
    assert rm.weighted_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0]),
                           np.array([1.0, 1.0, 1.0, 2.0])) == pytest.approx(5.5 / 6)
    # grouped: request A (4 candidates) AUC 1.0; request B (2 candidates) AUC 0.0; request C single-class: skipped
    scores = np.array([0.9, 0.8, 0.2, 0.1, 0.1, 0.9, 0.5, 0.6])
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    starts = np.array([0, 4, 6, 8])
    per, w = rm.request_aucs(scores, labels, starts)
    assert per[:2].tolist() == [1.0, 0.0] and np.isnan(per[2]) and w.tolist() == [4, 2, 2]
    assert rm.grouped_auc(scores, labels, starts) == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)


def test_paired_lift_is_exact_for_identical_models_and_its_interval_covers_the_point():
    rng = np.random.default_rng(0)
    base = rng.random(300)
    draws = rm.bootstrap_draws(300, 200, seed=1)
    lift, ci = rm.paired_lift(base, base, draws)
    assert lift == 0.0 and ci == [0.0, 0.0]
    better = base * 1.2
    lift, ci = rm.paired_lift(better, base, draws)
    assert lift == pytest.approx(0.2) and ci[0] == pytest.approx(0.2) and ci[1] == pytest.approx(0.2)
    noisy = base + rng.normal(0, 0.3, 300)
    lift, ci = rm.paired_lift(noisy, base, draws)
    assert ci[0] < lift < ci[1]


def test_dcn_v2_cross_network_matches_its_formula():
    torch.manual_seed(0)
    net = CrossNetwork(7, 3)
    x0 = torch.randn(5, 7)
    x = x0
    for layer in net.layers:
        x = x0 * (x @ layer.weight.T + layer.bias) + x  # x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l
    assert torch.allclose(net(x0), x, atol=1e-6)
    assert torch.equal(CrossNetwork(7, 0)(x0), x0)


def test_multitask_bce_default_is_plain_bce_and_the_label_weight_matrix_reweights_heads():
    heads = ["save", "like", "hide"]
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4]])
    labels = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    m = label_weight_matrix(MultiTaskLossConfig(), heads)
    assert torch.equal(head_weights(labels, m), torch.ones(2, 3))
    plain = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1).mean()
    assert torch.allclose(multitask_bce(logits, labels, m, torch.ones(2)), plain)
    # the paper's example: a hide raises the weight of the positive heads (w_save = 1 + 2·y_hide)
    m2 = label_weight_matrix(MultiTaskLossConfig(label_weights={"save": {"hide": 2.0}, "like": {"impression": 0.5}}),
                             heads)
    w = head_weights(labels, m2)
    assert w.tolist() == [[3.0, 0.5, 1.0], [1.0, 0.5, 1.0]]
    per_row = (w * F.binary_cross_entropy_with_logits(logits, labels, reduction="none")).sum(1)
    uw = torch.tensor([2.0, 1.0])
    assert torch.allclose(multitask_bce(logits, labels, m2, uw), (uw * per_row).sum() / 3.0)
    with pytest.raises(PinnerformerError, match="unknown head 'click'"):
        label_weight_matrix(MultiTaskLossConfig(label_weights={"click": {"hide": 1.0}}), heads)
    with pytest.raises(PinnerformerError, match=r"unknown label 'repin' \(expected one of: impression, save"):
        label_weight_matrix(MultiTaskLossConfig(label_weights={"save": {"repin": 1.0}}), heads)


def test_user_weights_inverse_sqrt_have_mean_one_and_favour_light_users():
    users = np.array([0, 0, 0, 0, 1])
    w = user_row_weights("inverse-sqrt", users, 2)
    assert w.mean() == pytest.approx(1.0) and w[4] == pytest.approx(2 * w[0])
    assert user_row_weights("none", users, 2).tolist() == [1.0] * 5


def test_request_weights_make_every_request_weigh_the_same_and_compose_with_user_weights():
    from pinnerformer.objectives.multitask_bce import row_weights

    users, requests = np.array([0, 0, 0, 0, 1]), np.array([7, 7, 7, 9, 3])  # requests of 3, 1 and 1 rows
    w = row_weights(MultiTaskLossConfig(request_weight="inverse"), users, requests, 2)
    per_request = {r: w[requests == r].sum() for r in (7, 9, 3)}
    assert w.mean() == pytest.approx(1.0) and per_request[7] == pytest.approx(per_request[9]) == pytest.approx(
        per_request[3])
    w = row_weights(MultiTaskLossConfig(request_weight="inverse-sqrt"), users, requests, 2)
    assert w[3] == pytest.approx(np.sqrt(3) * w[0])
    both = row_weights(MultiTaskLossConfig(request_weight="inverse", user_weight="inverse-sqrt"), users, requests, 2)
    # user 0 has 4 rows, user 1 one: 1/sqrt(4) against 1/sqrt(1), then each request's 1/size
    assert both[4] / both[3] == pytest.approx(2.0) and both[3] / both[0] == pytest.approx(3.0)
    assert row_weights(MultiTaskLossConfig(), users, requests, 2).tolist() == [1.0] * 5


def test_heads_text_round_trips_and_names_what_is_wrong():
    names = ["love", "like", "neutral", "dislike"]
    heads = parse_heads("save=love; like=love,like; hide=-dislike", names)
    assert [(h.name, h.actions, h.negative) for h in heads] == [
        ("save", ["love"], False), ("like", ["love", "like"], False), ("hide", ["dislike"], True)]
    assert "; ".join(h.text() for h in heads) == "save=love; like=love,like; hide=-dislike"
    with pytest.raises(PinnerformerError, match=r"head 'save' names unknown action\(s\) 'repin' \(this dataset's "
                                                r"actions: love, like, neutral, dislike\)"):
        parse_heads("save=repin", names)
    with pytest.raises(PinnerformerError, match="'save' is not a head"):
        parse_heads("save", names)
    with pytest.raises(PinnerformerError, match="head 'save' is given twice"):
        parse_heads("save=love;save=like", names)


def test_interest_vectors_are_shared_within_a_category_fixed_and_zero_without_one():
    from pinnerformer.ranking.prepare import interest_vectors

    v = interest_vectors([["shoes"], ["shoes"], ["hats"], [], ["shoes", "hats"]])
    assert np.array_equal(v[0], v[1]) and not np.allclose(v[0], v[2]) and not v[3].any()
    assert np.allclose(np.linalg.norm(v[[0, 2, 4]], axis=1), 1.0)
    assert np.allclose(v[4], (v[0] + v[2]) / np.linalg.norm(v[0] + v[2]), atol=1e-6)
    assert np.array_equal(interest_vectors([["hats"]])[0], v[2])  # the same vector in any catalogue
