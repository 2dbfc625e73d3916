"""Contrastive regularisation of the user representation (the CL4SRec / DuoRec family's "unsupervised" view): the
same sequences encoded twice, with different dropout, must recognise each other among the batch.

    z1[b], z2[b]: the two encodings of sequence b at its newest query position (unit vectors for cosine scoring)
    loss = ½ (CE(z1 z2ᵀ / τ, diag) + CE(z2 z1ᵀ / τ, diag))

Another sequence whose next item is the same as b's is neither b's twin nor a negative (its logit is masked):
DuoRec treats such pairs as positives; pushing them apart would work against the main objective. Added to the
retrieval loss with weight `loss.contrastive_weight` (0: off; one more encoder pass per step when on).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def newest_query_rows(q_example: np.ndarray, q_position: np.ndarray) -> np.ndarray:
    """The row of each example's query at its largest position, for the examples that have queries (an example can
    have none: the dense objectives keep only positions with a positive in their window), in example order."""
    if not len(q_example):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((q_position, q_example))  # by example, then position: each example's last row is its newest
    return order[np.r_[np.flatnonzero(np.diff(q_example[order])), len(order) - 1]]


def twin_view_info_nce(z1: torch.Tensor, z2: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """z1, z2 [B, D] two encodings of the same B sequences; target [B] each one's next item -> the symmetric
    InfoNCE above (a scalar), pairs other than the twins that share a target masked out of the negatives."""
    B = z1.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=z1.device)
    same_target = (target[:, None] == target[None, :]) & ~eye
    logits = (z1.float() @ z2.float().T / temperature).masked_fill(same_target, float("-inf"))
    labels = torch.arange(B, device=z1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
