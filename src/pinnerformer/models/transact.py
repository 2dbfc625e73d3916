"""TransAct (Xia et al., KDD 2023): the realtime user-action sequence, fused with each candidate, for the ranker.

Per action of the user's most recent `seq_len` actions, newest first ("early fusion", `fusion`):
    concat    [action-type embedding (32) ‖ item vector (32) ‖ candidate vector (32)]     (the paper's choice)
    append    [action ‖ item] per action, and the candidate as one more token [0 ‖ candidate] at the front
    none      [action ‖ item]: the sequence does not see the candidate
Item and candidate vectors are the same frozen vectors (a content vector, or a PinnerFormer item embedding),
projected to `item_dim` when their width differs.
Encoder: `layers` post-LN transformer encoder layers (1 head, FFN 32, dropout 0.1), no positional encoding and no
causal mask: every action sees every other; padding is masked out.
Random time-window mask (training only): per example T ~ U[0, `time_window_hours`]; the actions of the T before the
request are hidden, so that the model does not lean only on the very last actions (they may not be logged yet at
serving time); the newest action is never hidden when that would hide them all.
Output (`output`): the first K = 10 positions (the newest actions) ‖ a max-pool over the visible positions,
flattened — (K + 1)·d values, 1056 for d = 96; or the max-pool alone, the first K alone, or every position.

Serving: the candidates of one request share its sequence, so the sequence part of the first layer's input
projection is computed once per request: W·[s ‖ c] = W_s·s + W_c·c, and so is the sequence-only part of the first
layer's attention scores (`forward_request`, tested equal to `forward`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from pinnerformer.config import StrictModel


class TransActConfig(StrictModel):
    seq_len: int = Field(100, ge=1)  # the realtime sequence: the most recent actions before the request
    action_dim: int = Field(32, ge=1)
    item_dim: int = Field(32, ge=1)  # item and candidate vectors, projected to this width where needed
    layers: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    ffn: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    fusion: Literal["concat", "append", "none"] = "concat"
    output: Literal["first-k+max", "max", "first-k", "all"] = "first-k+max"
    first_k: int = Field(10, ge=1)
    time_window_hours: float = Field(24.0, ge=0)  # 0: no time-window mask
    positional: bool = False  # learned position embeddings (BST, Chen et al. 2019); TransAct has none


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout drawn by comparing uniforms: the same distribution as `F.dropout`, about twice as fast on
    CPU (torch's `bernoulli_` was a fifth of a CPU training step)."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


class EncoderLayer(nn.Module):
    """Post-LN transformer encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)). `qkv` may be given (precomputed).
    A query with no visible key attends to nothing (output 0), in both forms below."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.p = dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, h, T, dh]; keys seen: the visible ones, and where `attn_mask` [T, T] (query, key) allows (e.g. causal).
        In training with dropout, written out (softmax, then dropout on the weights), since SDPA's own attention
        dropout is slow on CPU; otherwise SDPA."""
        mask = visible[:, None, None, :] if attn_mask is None else visible[:, None, None, :] & attn_mask
        if not (self.training and self.p > 0):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        w = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        w = torch.where(mask.any(-1, keepdim=True), w, torch.zeros_like(w))  # a query that sees nothing: 0, not NaN
        return dropout(w, self.p, True) @ v

    def forward(self, x: torch.Tensor, visible: torch.Tensor, qkv: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d]; visible [B, T] (False: padding or masked out); qkv [B, T, 3d] when precomputed; attn_mask
        [T, T] bool (query, key) on top of `visible` (True: may attend)."""
        B, T, d = x.shape
        qkv = self.qkv(x) if qkv is None else qkv
        q, k, v = qkv.view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attention(q, k, v, visible, attn_mask)
        x = self.ln1(x + dropout(self.proj(a.transpose(1, 2).reshape(B, T, d)), self.p, self.training))
        return self.ln2(x + dropout(self.ffn(x), self.p, self.training))


class TransAct(nn.Module):
    def __init__(self, cfg: TransActConfig, n_actions: int, vector_dim: int):
        """n_actions: action types (index 0 of the table is reserved: padding / unknown); vector_dim: the width of
        the item and candidate vectors."""
        super().__init__()
        self.cfg = cfg
        self.action_emb = nn.Embedding(n_actions + 1, cfg.action_dim)
        self.item_proj = nn.Identity() if vector_dim == cfg.item_dim else nn.Linear(vector_dim, cfg.item_dim)
        self.token_dim = cfg.action_dim + cfg.item_dim + (cfg.item_dim if cfg.fusion == "concat" else 0)
        if self.token_dim % cfg.heads:
            raise ValueError(f"token width {self.token_dim} is not divisible by {cfg.heads} heads")
        self.layers = nn.ModuleList([EncoderLayer(self.token_dim, cfg.heads, cfg.ffn, cfg.dropout)
                                     for _ in range(cfg.layers)])
        n_positions = cfg.seq_len + (1 if cfg.fusion == "append" else 0)
        self.position = nn.Embedding(n_positions, self.token_dim) if cfg.positional else None

    @property
    def out_dim(self) -> int:
        n = self.cfg.seq_len + (1 if self.cfg.fusion == "append" else 0)
        return self.token_dim * {"first-k+max": self.cfg.first_k + 1, "max": 1, "first-k": self.cfg.first_k,
                                 "all": n}[self.cfg.output]

    def visible(self, action: torch.Tensor, age_s: torch.Tensor) -> torch.Tensor:
        """[B, T] positions that take part: real actions (action > 0), minus, in training, those of a random
        window T ~ U[0, h] before the request; never all of them (the newest stays)."""
        real = action > 0
        if not self.training or self.cfg.time_window_hours <= 0:
            return real
        window = torch.rand(action.shape[0], 1, device=action.device) * self.cfg.time_window_hours * 3600.0
        keep = real & (age_s >= window)
        emptied = ~keep.any(1) & real.any(1)
        keep[:, 0] |= emptied  # position 0 is the newest action
        return keep

    def tokens(self, action: torch.Tensor, item_vec: torch.Tensor, cand_vec: torch.Tensor) -> torch.Tensor:
        """[B, T, d] (append: [B, T + 1, d], the candidate token first)."""
        s = torch.cat([self.action_emb(action), self.item_proj(item_vec)], -1)
        c = self.item_proj(cand_vec)
        if self.cfg.fusion == "concat":
            return torch.cat([s, c.unsqueeze(1).expand(-1, s.shape[1], -1)], -1)
        if self.cfg.fusion == "append":
            c_tok = torch.cat([torch.zeros_like(s[:, :1, :self.cfg.action_dim]), c.unsqueeze(1)], -1)
            return torch.cat([c_tok, s], 1)
        return s

    def forward(self, action: torch.Tensor, item_vec: torch.Tensor, age_s: torch.Tensor, cand_vec: torch.Tensor,
                visible: torch.Tensor | None = None) -> torch.Tensor:
        """One row per (request, candidate): action [B, T] (newest first, 0 = padding), item_vec [B, T, E],
        age_s [B, T] seconds before the request, cand_vec [B, E] -> [B, out_dim]."""
        vis = self.visible(action, age_s) if visible is None else visible
        x = self.tokens(action, item_vec, cand_vec)
        if self.position is not None:
            x = x + self.position.weight[:x.shape[1]]
        if self.cfg.fusion == "append":
            vis = torch.cat([torch.ones_like(vis[:, :1]), vis], 1)
        for layer in self.layers:
            x = layer(x, vis)
        return self.compress(x, vis)

    def forward_request(self, action: torch.Tensor, item_vec: torch.Tensor, age_s: torch.Tensor,
                        cand_vec: torch.Tensor) -> torch.Tensor:
        """The candidates [C, E] of one request sharing its sequence (action [T], item_vec [T, E], age_s [T]):
        the same as `forward` on C copies of the sequence (concat fusion, eval mode), with the sequence part of
        the first input projection computed once: W·[s ‖ c] = W_s·s + W_c·c."""
        if self.cfg.fusion != "concat" or self.training or self.position is not None:
            C = cand_vec.shape[0]
            rep = lambda t: t.unsqueeze(0).expand(C, *t.shape)  # noqa: E731
            return self.forward(rep(action), rep(item_vec), rep(age_s), cand_vec)
        C = cand_vec.shape[0]
        s = torch.cat([self.action_emb(action), self.item_proj(item_vec)], -1)  # [T, ds]
        c = self.item_proj(cand_vec)  # [C, dc]
        vis_t = action > 0
        if not vis_t.any():  # no action at all: the plain form (rare; its attention has nothing to attend to)
            rep = lambda t: t.unsqueeze(0).expand(C, *t.shape)  # noqa: E731
            return self.forward(rep(action), rep(item_vec), rep(age_s), cand_vec)
        x = self._first_layer_shared(s, c, vis_t)
        vis = vis_t.unsqueeze(0).expand(C, -1)
        for layer in self.layers[1:]:
            x = layer(x, vis)
        return self.compress(x, vis)

    def _first_layer_shared(self, s: torch.Tensor, c: torch.Tensor, vis_t: torch.Tensor) -> torch.Tensor:
        """The first encoder layer for C candidates sharing one sequence (eval mode). With q_i = qs_i + qc (and k, v
        alike), the scores split into a sequence-only part computed once and cheap per-candidate terms:
            q_i·k_j = qs_i·ks_j + qs_i·kc + qc·ks_j + qc·kc
        and, the attention weights of a row summing to 1, Σ_j p_ij (vs_j + vc) = Σ_j p_ij vs_j + vc."""
        first, C, T = self.layers[0], c.shape[0], s.shape[0]
        d, h = self.token_dim, first.heads
        dh = d // h
        w_s, w_c = first.qkv.weight.split([s.shape[-1], c.shape[-1]], dim=1)
        qs, ks, vs = F.linear(s, w_s, first.qkv.bias).view(T, 3, h, dh).unbind(1)  # [T, h, dh] each
        qc, kc, vc = F.linear(c, w_c).view(C, 3, h, dh).unbind(1)  # [C, h, dh] each
        scores = (torch.einsum("ihd,jhd->hij", qs, ks).unsqueeze(0)  # [1, h, T, T]: once per request
                  + torch.einsum("ihd,chd->chi", qs, kc).unsqueeze(-1)
                  + torch.einsum("chd,jhd->chj", qc, ks).unsqueeze(-2)
                  + (qc * kc).sum(-1)[:, :, None, None]) * dh ** -0.5  # [C, h, T, T]
        p = torch.softmax(scores.masked_fill(~vis_t, float("-inf")), -1)
        a = torch.matmul(p, vs.transpose(0, 1)) + vc.unsqueeze(2)  # [C, h, T, dh]
        x = torch.cat([s.unsqueeze(0).expand(C, -1, -1), c.unsqueeze(1).expand(-1, T, -1)], -1)
        x = first.ln1(x + first.proj(a.transpose(1, 2).reshape(C, T, d)))
        return first.ln2(x + first.ffn(x))

    def compress(self, x: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, out_dim] by `output` (positions are newest first)."""
        cfg, B = self.cfg, x.shape[0]
        if cfg.output == "all":
            return (x * vis.unsqueeze(-1)).reshape(B, -1)
        pooled = x.masked_fill(~vis.unsqueeze(-1), float("-inf")).amax(1)
        pooled = torch.where(vis.any(1, keepdim=True), pooled, torch.zeros_like(pooled))  # no action at all: 0
        first = (x * vis.unsqueeze(-1))[:, :cfg.first_k]
        if first.shape[1] < cfg.first_k:  # sequences shorter than K: zero-padded
            first = F.pad(first, (0, 0, 0, cfg.first_k - first.shape[1]))
        if cfg.output == "max":
            return pooled
        if cfg.output == "first-k":
            return first.reshape(B, -1)
        return torch.cat([first.reshape(B, -1), pooled], -1)
