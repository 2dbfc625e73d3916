"""Distillation from a frozen teacher into one network (Hinton et al., "Distilling the knowledge in a neural
network", 2015; for an ensemble teacher, Buciluǎ et al., "Model compression", KDD 2006): each query's next-item
distribution over the whole catalogue is pulled toward a trained teacher's.

    teacher    a trained leave-one-out run on the same dataset (one network or an ensemble), and, when that run
               chose one, its item-to-item blend (evaluation/blend.py) with the λ it chose on validation:
                   p_T(i) = (1 - λ) · softmax(s_T(u, ·) / τ_T)[i] + λ · knn(u, i) / Σ_j knn(u, j)
               s_T the teacher's (mean) cosine, τ_T its (mean) temperature, knn the neighbours' votes of the query's
               own prefix (its newest positive actions up to the query's position); both over the items the
               student's loss may score (the example's own other positives are masked, as in the loss)
    student    q(i) = softmax(s(u, ·) / τ)[i] over the same items
    term       KL(p_T ‖ q) per query, reduced over the batch as the loss is (`reduce_queries`); at a distillation
               temperature T ≠ 1 (`loss.teacher_temperature`), T² · KL(p_T^(1/T) / Z ‖ softmax(s / (τ T))): both
               softened, the teacher by a power so that its blend's mixture is softened as one distribution

Added with weight `loss.teacher_weight`; the student still learns from the labels. What one network alone could not
reach this way: the teacher's knowledge of which wrong answers are near misses, including the neighbours' votes
for items its own table has seldom seen. At inference the student is one network: no teacher, no neighbours. The
teacher never saw the validation or test targets (a leave-one-out run trains on every timeline but its last two
actions, and its neighbours are fit on the same part), so nothing leaks into selection or test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pinnerformer.data.timelines import Timelines
from pinnerformer.models.item_knn import ItemKNN
from pinnerformer.models.pinnerformer import members_of
from pinnerformer.objectives.sampled_softmax import own_positive_catalogue_mask, reduce_queries


@dataclass
class Teacher:
    model: torch.nn.Module  # a trained PinnerFormer or PinnerFormerEnsemble, in eval mode
    knn: ItemKNN | None  # its neighbours, when its blend is used
    blend_weight: float  # λ (0 without neighbours)
    source: str  # where it came from (the run, its checkpoint's sha256), for the run's notes
    n_items: int  # the catalogue it scores
    items: list[torch.Tensor] | None = None  # each member's item table, made once (`item_tables`)


def own_positive_full_mask(q_example: torch.Tensor, q_item: torch.Tensor, label_example: torch.Tensor,
                           label_item: torch.Tensor, n_examples: int, n_items: int) -> torch.Tensor:
    """[Q, I] True = not scored: the example's positive labels other than the query's own target (the loss's
    `mask_own_positives` over the whole catalogue)."""
    mask = own_positive_catalogue_mask(q_example, label_example, label_item, n_examples, n_items)
    mask[torch.arange(len(q_item), device=mask.device), q_item] = False
    return mask


def item_tables(teacher: Teacher, device: torch.device) -> list[torch.Tensor]:
    """Each teacher member's [I, D] item embeddings, made once: the teacher is frozen, so every step would make the
    same tables again."""
    if teacher.items is None or teacher.items[0].device != device:
        teacher.model.to(device)
        with torch.no_grad():
            every = torch.arange(teacher.n_items, device=device)
            teacher.items = [m.item_embedding(every) for m in members_of(teacher.model)]
    return teacher.items


@torch.no_grad()
def teacher_probabilities(teacher: Teacher, seq: dict[str, torch.Tensor], q_example: torch.Tensor,
                          q_position: torch.Tensor, mask: torch.Tensor, timelines: Timelines,
                          prefix_starts: np.ndarray, prefix_ends: np.ndarray) -> torch.Tensor:
    """[Q, I] p_T for the queries (example, position) of the batch `seq`; prefix_starts / prefix_ends: each
    query's own prefix in the timelines (for the neighbours' votes)."""
    members = members_of(teacher.model)
    cosine = None
    # the members' mean cosine: the ensemble's own score (PinnerFormerEnsemble)
    for m, items in zip(members, item_tables(teacher, q_example.device)):
        out = m.encode_sequence(seq)
        q = out.reshape(-1, out.shape[-1]).index_select(0, q_example * out.shape[1] + q_position)
        s = q @ items.T
        cosine = s if cosine is None else cosine + s
    logits = (cosine / len(members)) / teacher.model.temperature
    p = torch.softmax(logits.float().masked_fill(mask, float("-inf")), dim=-1)
    if teacher.knn is None or teacher.blend_weight == 0.0:
        return p
    votes = teacher.knn.scores(timelines, prefix_starts, prefix_ends).to(p.device).masked_fill(mask, 0.0)
    total = votes.sum(-1, keepdim=True)
    # a query whose prefix has no neighbours keeps the network's distribution (as the blend ranks it)
    knn = torch.where(total > 0, votes / total.clamp(min=torch.finfo(torch.float32).tiny), p)
    return (1.0 - teacher.blend_weight) * p + teacher.blend_weight * knn


def distillation_kl(student_logits: torch.Tensor, teacher_p: torch.Tensor, mask: torch.Tensor,
                    q_example: torch.Tensor, n_examples: int, weighting: str = "example",
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T ‖ softmax(student_logits)) per query over the unmasked items, reduced as the loss is. Masked items
    have p_T = 0 and contribute nothing (no 0 · ∞ is formed). temperature T ≠ 1: T² · KL of the softened pair."""
    log_p = torch.log(teacher_p.clamp(min=torch.finfo(torch.float32).tiny))
    logits = student_logits.float()
    if temperature != 1.0:
        # p_T^(1/T), renormalised over the items it gives mass (an item at p_T = 0 stays at 0)
        log_p = F.log_softmax((log_p / temperature).masked_fill(teacher_p == 0, float("-inf")), dim=-1)
        teacher_p = torch.exp(log_p).masked_fill(teacher_p == 0, 0.0)
        logits = logits / temperature
    log_q = F.log_softmax(logits.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)
    per_query = (teacher_p * (log_p - log_q)).masked_fill(teacher_p == 0, 0.0).sum(-1)
    return temperature ** 2 * reduce_queries(per_query, q_example, n_examples, weighting)
