"""Candidate-anchored nearest-neighbour selection (TransAct V2: Xia et al. 2025, "TransAct V2: Lifelong User
Action Sequence Modeling on Pinterest Recommendation"): for every candidate, the k tokens of a
user's sequence whose item vectors have the largest dot product with the candidate's, returned in time order.

A request scores many candidates against few users' sequences (usually one). The plain reference copies the
sequence once per candidate (`repeat_interleave` + `bmm`: B × S × D values, 4 GB for 1,000 candidates × 16,384
actions × 64); the fast form dequantises and normalises each user's int8 sequence once and runs one batched product
over users, the candidates grouped by user (an offsets tensor maps them) and padded to the largest group:
U × C_max × S scores and no copy of any sequence. Both return the same scores (tested), and the same selections.

Ties: among equal scores the newer token is taken (the larger position). Invalid positions (padding, or tokens a
view hides) are never selected; a sequence with fewer than k valid tokens yields -1 for the missing ones.
Selections come back sorted in time order (oldest first), the -1s last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pinnerformer.ops.quantize import dequantize_normalize


def nn_scores_reference(seq_q: torch.Tensor, scale: float, zero: float, cand_user: torch.Tensor,
                        cand: torch.Tensor) -> torch.Tensor:
    """[B, S]: seq_q [U, S, D] int8, cand_user [B] (each candidate's user), cand [B, D] -> cosine scores, with a
    copy of the sequence per candidate (the naive path)."""
    per_candidate = dequantize_normalize(seq_q, scale, zero).repeat_interleave(
        torch.bincount(cand_user, minlength=seq_q.shape[0]), dim=0)  # [B, S, D]
    return torch.bmm(per_candidate, F.normalize(cand.float(), dim=-1).unsqueeze(-1)).squeeze(-1)


def group_positions(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates grouped by user (user u owns offsets[u]:offsets[u+1]) -> each candidate's user and its position
    inside the group."""
    counts = offsets[1:] - offsets[:-1]
    user = torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts)
    return user, torch.arange(len(user), device=offsets.device) - offsets[:-1][user]


def nn_scores(seq_q: torch.Tensor, scale: float, zero: float, offsets: torch.Tensor, cand: torch.Tensor
              ) -> torch.Tensor:
    """[B, S] like `nn_scores_reference` (candidates grouped by user, `offsets` [U + 1]): each sequence dequantised
    once, one batched product, no per-candidate copy."""
    seq = dequantize_normalize(seq_q, scale, zero)  # [U, S, D]
    user, pos = group_positions(offsets)
    c_max = int((offsets[1:] - offsets[:-1]).max()) if len(user) else 0
    padded = cand.new_zeros((seq.shape[0], c_max, cand.shape[1]), dtype=torch.float32)
    padded[user, pos] = F.normalize(cand.float(), dim=-1)
    return torch.bmm(padded, seq.transpose(1, 2))[user, pos]  # [U, C_max, S] -> [B, S]


def kth_best(masked: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1] the k-th best score of each row (-inf when the row has fewer than k valid tokens)."""
    return torch.topk(masked, min(k, masked.shape[1]), dim=1).values[:, -1:]


def take_top_k(masked: torch.Tensor, kth: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] positions, oldest first, -1 padded: every valid token above the k-th best score, and of those equal to
    it the newest ones that complete k (no sort of the whole row)."""
    B = masked.shape[0]
    out = torch.full((B, k), -1, dtype=torch.long, device=masked.device)
    above = valid & (masked > kth)
    tied = valid & (masked == kth)
    room = k - above.sum(1, keepdim=True)
    take = above | tied
    over = torch.nonzero(tied.sum(1, keepdim=True) > room, as_tuple=True)[0]  # rows with more ties than room (rare)
    if len(over):  # keep the newest ties: counted from the newest back
        t = tied[over]
        take[over] = above[over] | (t & (t.flip(1).cumsum(1).flip(1) <= room[over]))
    row, pos = torch.nonzero(take, as_tuple=True)  # row-major: positions ascending within a row
    first = torch.searchsorted(row, torch.arange(B, device=row.device))
    out[row, torch.arange(len(row), device=row.device) - first[row]] = pos
    return out


def top_k_in_time_order(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] positions of the k best valid tokens per row (ties: the newer), sorted oldest first, -1 where a row
    has fewer than k valid tokens."""
    B, S = scores.shape
    if k == 0 or S == 0:
        return torch.full((B, k), -1, dtype=torch.long, device=scores.device)
    masked = scores.masked_fill(~valid, float("-inf"))
    return take_top_k(masked, kth_best(masked, k), valid, k)


def top_k_reference(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The definition, row by row in Python: sort valid positions by (score desc, position desc), keep k, sort."""
    out = []
    for s, v in zip(scores.tolist(), valid.tolist()):
        cands = sorted((j for j in range(len(s)) if v[j]), key=lambda j: (-s[j], -j))[:k]
        out.append(sorted(cands) + [-1] * (k - len(cands)))
    return torch.tensor(out, dtype=torch.long).reshape(len(out), k)


def select_nearest(seq_q: torch.Tensor, scale: float, zero: float, offsets: torch.Tensor, cand: torch.Tensor,
                   valid: torch.Tensor, k: int) -> torch.Tensor:
    """Dequantise + normalise + score + top-k for candidates grouped by user: [B, k] positions (see above); `valid`
    [U, S] per user's token."""
    user, _ = group_positions(offsets)
    return top_k_in_time_order(nn_scores(seq_q, scale, zero, offsets, cand), valid[user], k)


def _dense(seq_q: torch.Tensor, scale: float, zero: float, cand_padded: torch.Tensor, valid: torch.Tensor, k: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense part for candidates padded per user [U, C_max, D]: dequantise, normalise, score, mask, k-th best:
    masked scores [U, C_max, S] and thresholds [U, C_max, 1]. Fixed shapes: one compiled graph."""
    seq = dequantize_normalize(seq_q, scale, zero)
    masked = torch.bmm(F.normalize(cand_padded, dim=-1), seq.transpose(1, 2)).masked_fill(~valid.unsqueeze(1),
                                                                                           float("-inf"))
    return masked, torch.topk(masked, min(k, masked.shape[-1]), dim=-1).values[..., -1:]


_compiled = None


def select_nearest_fused(seq_q: torch.Tensor, scale: float, zero: float, offsets: torch.Tensor, cand: torch.Tensor,
                         valid: torch.Tensor, k: int) -> torch.Tensor:
    """`select_nearest` with its dense part (dequantise + normalise + score + mask + k-th best) as one
    torch.compile graph; the data-dependent assembly of the positions stays eager."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_dense, dynamic=True)
    B, S = len(cand), seq_q.shape[1]
    if k == 0 or S == 0:
        return torch.full((B, k), -1, dtype=torch.long, device=cand.device)
    user, pos = group_positions(offsets)
    c_max = int((offsets[1:] - offsets[:-1]).max()) if B else 0
    padded = cand.new_zeros((seq_q.shape[0], c_max, cand.shape[1]), dtype=torch.float32)
    padded[user, pos] = cand.float()
    masked, kth = _compiled(seq_q, scale, zero, padded, valid, k)
    return take_top_k(masked[user, pos], kth[user, pos], valid[user], k)
