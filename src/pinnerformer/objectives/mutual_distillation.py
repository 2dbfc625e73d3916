"""Mutual distillation between an ensemble's members (deep mutual learning, as EMKD applies it to sequential
recommenders): each member's sampled-softmax distribution over its query's candidates is pulled toward the
ensemble's.

    z_k [Q, C]   member k's logQ-corrected logits over the same candidates (column 0 the positive, then the pool;
                 masked candidates are -inf in every member, since the mask comes from the batch)
    teacher      p = softmax(mean_k z_k), held fixed (no gradient): the ensemble's own ranking of the candidates,
                 the members' mean score, as `PinnerFormerEnsemble` scores them
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
    kept = torch.isfinite(stacked[0])
    mean = torch.where(kept, stacked, torch.zeros_like(stacked)).mean(0).masked_fill(~kept, float("-inf"))
    log_teacher = F.log_softmax(mean, dim=-1).detach()
    teacher = log_teacher.exp()
    terms = []
    for z in stacked:
        # masked candidates: p = 0 and log p = -inf; their terms are 0 by definition (not 0 · ∞)
        per_query = torch.where(kept, teacher * (log_teacher - F.log_softmax(z, dim=-1)),
                                torch.zeros_like(z)).sum(-1)
        terms.append(reduce_queries(per_query, q_example, n_examples, weighting))
    return terms
