"""Mutual distillation between an ensemble's members (deep mutual learning, as EMKD applies it to sequential
recommenders): each member's sampled-softmax distribution over its query's candidates is pulled toward the
ensemble's.

    z_k [Q, C]   member k's logQ-corrected logits over the same candidates (column 0 the positive, then the pool;
                 masked candidates are -inf in every member, since the mask comes from the batch)
    teacher      p = softmax(mean_k z_k), held fixed (no gradient): the members' mean logit (cos_k / τ_k - log Q);
                 `PinnerFormerEnsemble` ranks by the mean cosine, the same order while the learned τ_k agree
    term_k       KL(p ‖ softmax(z_k)) per query, reduced over the batch like the loss itself

Added to each member's loss with weight `loss.distill_weight` (0: off). The members still train on the labels;
the term passes to each what the others learned about the rest of the candidates (soft targets: which negatives
are near misses), which one-hot labels never say.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pinnerformer.objectives.sampled_softmax import reduce_queries


def ensemble_distillation(logits: list[torch.Tensor], q_example: torch.Tensor, n_examples: int,
                          weighting: str = "example") -> list[torch.Tensor]:
    """logits: each member's [Q, C] over the same candidates (-inf = masked, the same entries in every member) ->
    each member's KL(teacher ‖ member) as a scalar, reduced over queries as `reduce_queries` does."""
    if len(logits) < 2:
        raise ValueError("mutual distillation needs at least two members")
    stacked = torch.stack([z.float() for z in logits])  # [K, Q, C]
    kept = stacked[0] != float("-inf")
    if not bool(((stacked != float("-inf")) == kept).all()):
        raise ValueError("the members' logits must mask the same candidates (-inf): they come from one batch")
    mean = stacked.masked_fill(~kept, 0.0).mean(0).masked_fill(~kept, float("-inf"))
    log_teacher = F.log_softmax(mean, dim=-1).detach()
    teacher = log_teacher.exp()  # 0 where masked
    safe_log_teacher = log_teacher.masked_fill(~kept, 0.0)
    terms = []
    for z in stacked:
        # masked candidates: p = 0, their terms are 0 by definition; no 0 · ∞ is ever formed
        log_member = F.log_softmax(z, dim=-1).masked_fill(~kept, 0.0)
        per_query = (teacher * (safe_log_teacher - log_member)).sum(-1)
        terms.append(reduce_queries(per_query, q_example, n_examples, weighting))
    return terms
