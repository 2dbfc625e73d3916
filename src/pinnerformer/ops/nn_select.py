"""Candidate-anchored nearest-neighbour selection (TransAct V2, SPEC §6): for every candidate, the k tokens of a
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


def top_k_in_time_order(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] positions of the k best valid tokens per row (ties: the newer), sorted oldest first, -1 where a row
    has fewer than k valid tokens."""
    B, S = scores.shape
    if k == 0 or S == 0:
        return torch.full((B, k), -1, dtype=torch.long, device=scores.device)
    masked = scores.masked_fill(~valid, float("-inf")).flip(1)  # newest first: a stable sort keeps the newer ahead
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
    picked = S - 1 - order  # back to positions
    ok = torch.gather(valid, 1, picked)
    picked = torch.where(ok, picked, torch.full_like(picked, S))  # invalid -> S, sorted to the end
    picked = torch.sort(picked, dim=1).values
    if k > S:  # fewer tokens than k: pad
        picked = torch.cat([picked, torch.full((B, k - S), S, dtype=picked.dtype, device=picked.device)], 1)
    return torch.where(picked >= S, torch.full_like(picked, -1), picked)


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


_compiled = None


def select_nearest_fused(seq_q: torch.Tensor, scale: float, zero: float, offsets: torch.Tensor, cand: torch.Tensor,
                         valid: torch.Tensor, k: int) -> torch.Tensor:
    """`select_nearest` as one compiled graph (torch.compile fuses the dequantisation, normalisation, scoring and
    masking; compiled on first use, dynamic shapes)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(select_nearest, dynamic=True)
    return _compiled(seq_q, scale, zero, offsets, cand, valid, k)
