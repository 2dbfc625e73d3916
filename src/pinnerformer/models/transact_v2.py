"""TransAct V2 ("TransAct V2: Lifelong User Action Sequence Modeling on Pinterest
Recommendation", Xia et al., 2025): a user's lifelong action sequence, cut per candidate to the tokens
nearest to it, encoded with the candidate.

Three sequences per request (all strictly before it, oldest first):
    lifelong     every explicit action older than the realtime window (up to `lifelong_max`, the newest kept)
    realtime     the `realtime_len` most recent explicit actions
    impressions  items shown and not engaged with
Selection for a candidate c (vectors: int8, dequantised and L2-normalised; `ops.nn_select`):
    S = NN(lifelong, c, k_lifelong) ⊕ realtime[-recent:] ⊕ NN(rest of realtime, c, k_realtime) ⊕ NN(impressions, c, k_imp)
192 tokens by default (96 + 32 + 32 + 32), each part in time order; missing tokens are padding.
Encoder: token = W·[item vector ‖ candidate vector] + action embedding (multi-hot: the sum over the token's
actions) + surface embedding + learned position (the token's place in S), d = 64; `layers` post-LN layers, 1 head,
FFN 32, causal mask (a token sees itself and the tokens before it in S; padding is never seen); output: max-pool
over the real tokens, then a linear map into the ranker's cross network.

Edge cases, by design: a user without lifelong history or impressions gets padding there (and no next-action
loss where nothing follows or no impression exists: skipped and counted per step); lifelong actions beyond
`lifelong_max` are cut, the newest kept, and counted per step (`lifelong_cut`); an item without a vector (a zero
content vector) dequantises to zero and scores 0 against every candidate, so it is chosen only when nothing
scores higher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.models.transact import EncoderLayer
from pinnerformer.ops.nn_select import select_nearest


class TransActV2Config(StrictModel):
    lifelong_max: int = Field(16_384, ge=0)
    realtime_len: int = Field(100, ge=0)
    impressions_max: int = Field(1_000, ge=0)  # the newest impressions kept per request
    k_lifelong: int = Field(96, ge=0)
    recent: int = Field(32, ge=0)  # the newest realtime actions, always kept
    k_realtime: int = Field(32, ge=0)  # nearest among the rest of the realtime window
    k_impressions: int = Field(32, ge=0)
    d: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    ffn: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    out_dim: int = Field(64, ge=1)

    @property
    def tokens(self) -> int:
        return self.k_lifelong + self.recent + self.k_realtime + self.k_impressions


@dataclass
class Stream:
    """One sequence per user of the request batch, oldest first, padded at the end: item [U, S] (index into the
    int8 table), actions [U, S, A] multi-hot float, surface [U, S] (code + 1, 0 = none), valid [U, S] bool."""

    item: torch.Tensor
    actions: torch.Tensor
    surface: torch.Tensor
    valid: torch.Tensor


def _take(stream: Stream, user: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tokens at positions pos [B, k] (-1: none) of each candidate's user's stream."""
    safe = pos.clamp(min=0)
    u = user.unsqueeze(1).expand_as(pos)
    real = (pos >= 0) & stream.valid[u, safe]
    return stream.item[u, safe], stream.actions[u, safe], stream.surface[u, safe], real


def select(cfg: TransActV2Config, table_q: torch.Tensor, scale: float, zero: float, lifelong: Stream,
           realtime: Stream, impressions: Stream, offsets: torch.Tensor, cand: torch.Tensor
           ) -> tuple[torch.Tensor, ...]:
    """Per candidate (grouped by user, `offsets`), the selected tokens S: item [B, T], actions [B, T, A],
    surface [B, T], real [B, T] with T = cfg.tokens."""
    counts = offsets[1:] - offsets[:-1]
    user = torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts)
    B = len(user)

    def nearest(stream: Stream, k: int, valid: torch.Tensor) -> torch.Tensor:
        if k == 0 or stream.item.shape[1] == 0:
            return torch.full((B, k), -1, dtype=torch.long, device=cand.device)
        return select_nearest(table_q[stream.item], scale, zero, offsets, cand, valid, k)

    R = realtime.item.shape[1]
    n_real = realtime.valid.sum(1)  # realtime tokens are the first n_real positions
    pos_r = torch.arange(R, device=cand.device).unsqueeze(0)
    is_recent = realtime.valid & (pos_r >= (n_real.unsqueeze(1) - cfg.recent))
    recent_pos = torch.where(is_recent, pos_r.expand_as(is_recent), torch.full_like(is_recent, R, dtype=torch.long))
    recent_pos = torch.sort(recent_pos, dim=1).values[:, :cfg.recent] if R else recent_pos[:, :0]
    recent_pos = torch.where(recent_pos >= R, torch.full_like(recent_pos, -1), recent_pos)
    if recent_pos.shape[1] < cfg.recent:
        recent_pos = F.pad(recent_pos, (0, cfg.recent - recent_pos.shape[1]), value=-1)
    parts = [(lifelong, nearest(lifelong, cfg.k_lifelong, lifelong.valid)),
             (realtime, recent_pos[user]),
             (realtime, nearest(realtime, cfg.k_realtime, realtime.valid & ~is_recent)),
             (impressions, nearest(impressions, cfg.k_impressions, impressions.valid))]
    taken = [_take(s, user, p) for s, p in parts]
    return tuple(torch.cat([t[i] for t in taken], 1) for i in range(4))


class TransActV2(nn.Module):
    def __init__(self, cfg: TransActV2Config, n_actions: int, n_surfaces: int, vector_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_proj = nn.Linear(2 * vector_dim, cfg.d)
        self.action = nn.Linear(n_actions, cfg.d, bias=False)  # multi-hot actions: the sum of their embeddings
        self.surface = nn.Embedding(n_surfaces + 1, cfg.d)
        self.position = nn.Embedding(cfg.tokens, cfg.d)
        self.layers = nn.ModuleList([EncoderLayer(cfg.d, cfg.heads, cfg.ffn, cfg.dropout)
                                     for _ in range(cfg.layers)])
        self.out = nn.Linear(cfg.d, cfg.out_dim)
        self.next_action = nn.Linear(cfg.d, vector_dim)  # a position's state -> the query of the next-action loss

    def forward(self, item_vec: torch.Tensor, actions: torch.Tensor, surface: torch.Tensor, real: torch.Tensor,
                cand_vec: torch.Tensor, return_states: bool = False):
        """Selected tokens item_vec [B, T, E] (unit vectors), actions [B, T, A], surface [B, T], real [B, T];
        candidate vectors [B, E] -> [B, out_dim] (and the token states [B, T, d] with return_states)."""
        B, T, _ = item_vec.shape
        x = self.token_proj(torch.cat([item_vec, cand_vec.unsqueeze(1).expand(-1, T, -1)], -1))
        x = x + self.action(actions) + self.surface(surface) + self.position.weight[:T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        for layer in self.layers:
            x = layer(x, real, attn_mask=causal)
        pooled = x.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(1)
        pooled = torch.where(real.any(1, keepdim=True), pooled, torch.zeros_like(pooled))  # nothing selected: 0
        return (self.out(pooled), x) if return_states else self.out(pooled)
