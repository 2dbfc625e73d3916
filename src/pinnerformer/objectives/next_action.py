"""TransAct V2's next-action loss (Xia et al. 2025): an auxiliary sampled softmax in which each realtime position of the
encoded sequence predicts the item of the next positive action, against negatives that are the user's impressions
(items shown and not engaged with: the default, better than in-batch in the paper) or the other positions' targets
in the batch (`in-batch`). Added to the ranker's loss with weight 0.01 by default.

    logit(query q, item v) = q · v / τ          q: the encoder state at position i, projected to the item width
    loss = mean over the positions that have a next positive action and at least one negative of
           -log softmax([q·v_next, q·v_neg_1, …, q·v_neg_M] / τ)[0]

Positions without a next positive action, and rows without a negative, are skipped and counted.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pinnerformer.config import StrictModel


class NextActionConfig(StrictModel):
    weight: float = Field(0.01, ge=0)  # 0: off
    negatives: Literal["impressions", "in-batch"] = "impressions"
    temperature: float = Field(0.1, gt=0)


def next_action_loss(query: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor, neg_valid: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, int]:
    """query [P, E], target [P, E] (unit vectors), negatives [P, M, E] with neg_valid [P, M] -> (mean loss over the
    positions that have a negative, their count). No position: a zero loss (that still carries a gradient)."""
    keep = neg_valid.any(1)
    if not keep.any():
        return query.sum() * 0.0, 0
    q, t, n, nv = query[keep], target[keep], negatives[keep], neg_valid[keep]
    pos = (q * t).sum(-1, keepdim=True)  # [P, 1]
    neg = torch.einsum("pe,pme->pm", q, n).masked_fill(~nv, float("-inf"))  # [P, M]
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), int(keep.sum())


def next_action_loss_reference(query, target, negatives, neg_valid, temperature) -> float:
    """The definition, position by position, in float64."""
    total, n = 0.0, 0
    for q, t, negs, nv in zip(query.double(), target.double(), negatives.double(), neg_valid):
        if not nv.any():
            continue
        scores = torch.cat([(q @ t).reshape(1), negs[nv] @ q]) / temperature
        total += float(-(scores[0] - torch.logsumexp(scores, 0)))
        n += 1
    return total / n if n else 0.0
