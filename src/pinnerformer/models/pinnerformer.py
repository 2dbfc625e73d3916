"""PinnerFormer: a causal transformer user tower and an MLP item tower in one embedding space.

Per action (the PinnerFormer paper, KDD 2022), concatenated and projected to width H:
    item features        content vector (frozen) and/or a learned item-ID embedding (optionally plus the mean of
                         learned embeddings of the item's interests: attributes, genres, categories)
    action, surface      small learned tables; index 0 is reserved for unknown / not recorded
    log(duration)        log1p(seconds) and a "missing" flag
    time (real clocks)   three Time2Vec-style encodings, cos/sin(2π·t/p + learned phase) plus log1p(t):
                         absolute time with 12 fixed periods; time since the query (the newest action by
                         default) and gap to the previous action with 32 log-spaced periods from 1 s to 4 weeks
User tower: learned position embedding (by index from the oldest action in the window, so that nothing at
position i depends on the actions after it; or, `position_from: newest`, by distance from the newest action, as
SASRec's left-padded positions count: the newest action is always at index 0), L pre-norm blocks with causal
self-attention,
head LayerNorm -> Linear(H,4H) -> GELU -> Linear(4H,D) -> L2 normalise at every position (`head: norm`: the
LayerNorm only, as SASRec). The user embedding
is the newest position's output. Item tower: MLP on the item features -> L2 normalise (or, as an option, one
linear layer, or none: the item features themselves, i.e. scoring with the input item table as SASRec does).
Score = cosine / τ, τ learned and clamped at τ >= 0.01 (or, `score: dot`, the plain dot product of unnormalised
embeddings, as SASRec scores).

Batches are right-padded (oldest action at position 0), so plain `is_causal=True` attention is exact for the
real positions (they never see the padding that follows them) and fused kernels apply on GPU.

Causality: the output at position i is a function of actions 0..i only — with two deliberate exceptions. With
`position_from: newest` it also depends on how many actions follow i (never on what they are): in training every
position then knows its distance from the end of the window, and the newest position, the one inference reads,
is trained on the sequences' last transitions as such. And one the paper describes: "time since the newest action" is measured from a query time, by default the newest action's
time. Pass an explicit query time (`build_sequence_batch(query_time=...)`) and the output at i is fully
independent of later actions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from pinnerformer.config import StrictModel
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.features.sequence_batch import ABS_PERIODS, REL_PERIODS


class PinnerFormerConfig(StrictModel):
    """The model's shape and feature switches: the `model` section of a training config."""

    width: int = Field(64, ge=1)  # H
    layers: int = Field(2, ge=0)  # L
    heads: int = Field(2, ge=1)
    dim: int = Field(64, ge=1)  # D
    dropout: float = Field(0.1, ge=0, lt=1)
    ffn_mult: int = Field(4, ge=1)  # the blocks' MLP width, as a multiple of H (SASRec's point-wise FFN: 1)
    # pre-norm: x + Attn(LN(x)), then x + FFN(LN(x)) with a GELU MLP. gated (the eSASRec / LiGR-style layer): each
    # branch's output is multiplied by a learned sigmoid gate of its normalised input, and the FFN is SwiGLU
    block: Literal["pre-norm", "gated"] = "pre-norm"
    # BSARec's frequency branch beside attention, made causal: each position's normalised input split into the low
    # frequencies of its own prefix (the first frequency_cutoff Fourier terms of the actions up to it, the constant
    # term included: BSARec's c keeps c // 2 + 1 of them, so its c = 5 is frequency_cutoff 3) and the rest,
    # recombined as low + β²·high (β learned per channel); the block adds frequency_mix × that + (1 -
    # frequency_mix) × attention. 0: attention only
    frequency_mix: float = Field(0.0, ge=0, le=1)
    frequency_cutoff: int = Field(5, ge=1)
    # K > 1: an ensemble of K such networks (`PinnerFormerEnsemble`), each initialised differently and trained on the
    # same batches with its own loss; an item's score is the mean of their scores (K times the work)
    members: int = Field(1, ge=1)
    # the user head: mlp = LayerNorm -> Linear(H, 4H) -> GELU -> Linear(4H, D) (the paper's); norm = the final
    # LayerNorm only (SASRec's), with a Linear(H, D) when D differs from H
    head: Literal["mlp", "norm"] = "mlp"
    # content: the item's content vector; id: a learned ID embedding; both; auto: both if the data has vectors
    item_features: Literal["auto", "content", "id", "both"] = "auto"
    id_dim: int = Field(64, ge=1)
    # the item's interests (attributes, brand, genres, categories: the dataset's item interests): the mean of their
    # learned embeddings (width id_dim) added to the item's ID embedding, so that rarely seen items share what their
    # interests learned. auto: when the dataset has interests (and the item features have an ID part)
    item_interests: Literal["auto", "on", "off"] = "off"
    # training only: each input action's item-ID embedding is left out with this probability (its interests stay),
    # so that the model cannot read an item by its ID alone (items without interests always keep their ID)
    id_dropout: float = Field(0.0, ge=0, lt=1)
    # the same for the items scored in training (positives and negatives): a left-out ID leaves the item's vector
    # to its interests, so that the scored table of rarely seen items leans on what their interests learned (no
    # effect with score=dot and item_tower=none, which score the raw table, nor on items without interests)
    target_id_dropout: float = Field(0.0, ge=0, lt=1)
    action_dim: int = Field(16, ge=1)
    surface_dim: int = Field(8, ge=1)
    item_tower_hidden: int = Field(256, ge=1)
    # The item features always feed both towers. mlp: the paper's item tower on top of them; linear: one
    # projection; none: the normalised features are the item embedding, so items are scored with the input item
    # table itself, as SASRec does (needs item features of width D)
    item_tower: Literal["mlp", "linear", "none"] = "mlp"
    input_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the summed input embedding, before the first block (SASRec's)
    init_temperature: float = Field(0.07, gt=0)
    # cosine: L2-normalised user and item embeddings, score = cosine / τ (τ learned); dot: unnormalised, score = the
    # dot product (SASRec's), so an item's norm can carry how often it is the answer; τ is then fixed at 1
    score: Literal["cosine", "dot"] = "cosine"
    # The residual stream between blocks: float32, or the autocast dtype when autocast is on ("compute": bf16 on GPU,
    # half the memory traffic of the LayerNorm/dropout/residual passes, at bf16 precision). No effect without autocast.
    residual_dtype: Literal["float32", "compute"] = "float32"
    # feature switches, for leave-one-feature-out ablations (time features also need a real clock)
    time_features: bool = True
    action_features: bool = True  # action-type embedding
    duration_surface_features: bool = True
    position_features: bool = True
    # oldest: position i is the i-th action of the window; newest: its distance from the newest action (SASRec's
    # left-padded positions: the newest always at index 0, so the position read at inference is always the same
    # embedding, trained on every sequence's last transition; position i then depends on how many actions follow)
    position_from: Literal["oldest", "newest"] = "oldest"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "PinnerFormerConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


@dataclass(frozen=True)
class InputSpec:
    """What the data fixes: vocabulary sizes, the input length M, the content vectors' width, a real clock."""

    n_items: int
    n_actions: int
    n_surfaces: int
    max_len: int  # M
    content_dim: int = 0  # 0: the dataset has no content vectors
    has_clock: bool = True  # False for order-only data: no time features
    # the interests vocabulary the model was trained with (index i = embedding row i); empty: no interest features
    interests: tuple[str, ...] = ()


class Time2Vec(nn.Module):
    """cos/sin(2π·x/p + φ) for fixed periods p with learned phases, plus log1p(x) for relative times."""

    def __init__(self, periods: list[float], with_log: bool):
        super().__init__()
        # log1p(x) is divided by log1p(longest period) so that it sits near [0, 1] like cos/sin: a raw log of
        # Unix seconds (~21) would drown the item features in the input projection.
        self.log_scale = 1.0 / math.log1p(max(periods))
        self.register_buffer("inv_period", 1.0 / torch.tensor(periods, dtype=torch.float32), persistent=False)
        self.phase_cos = nn.Parameter(torch.zeros(len(periods)))
        self.phase_sin = nn.Parameter(torch.zeros(len(periods)))
        self.with_log = with_log
        self.out_dim = 2 * len(periods) + int(with_log)

    def forward(self, x: torch.Tensor, frac: torch.Tensor | None = None) -> torch.Tensor:
        # frac = (x mod p)/p when given (computed exactly in float64 upstream: absolute times do not fit fp32)
        angle = 2 * math.pi * (frac if frac is not None else x.unsqueeze(-1) * self.inv_period)
        parts = [torch.cos(angle + self.phase_cos), torch.sin(angle + self.phase_sin)]
        if self.with_log:
            parts.append((torch.log1p(x.clamp(min=0)) * self.log_scale).unsqueeze(-1))
        return torch.cat(parts, dim=-1)


class ItemFeatures(nn.Module):
    """Raw item features shared by the action input and the item tower: content vector ‖ (ID embedding + mean of
    the item's interest embeddings)."""

    def __init__(self, kind: str, n_items: int, id_dim: int, content: torch.Tensor | None,
                 n_interests: int = 0, interests: torch.Tensor | None = None):
        """interests: [n_items', K] indexes into the n_interests embeddings, n_interests = none (padding); needed
        when n_interests > 0."""
        super().__init__()
        self.use_content, self.use_id = kind in ("content", "both"), kind in ("id", "both")
        if self.use_content:
            if content is None:
                raise PinnerformerError(f"item_features={kind} needs content vectors, but none were given")
            self.register_buffer("content", content.float(), persistent=False)  # frozen; rebuilt from dataset
        if self.use_id:
            self.id_emb = nn.Embedding(n_items, id_dim)
            nn.init.normal_(self.id_emb.weight, std=0.02)
        self.use_interests = n_interests > 0
        if self.use_interests:
            if not self.use_id or interests is None:
                raise PinnerformerError("interest features are added to the item-ID embedding: they need "
                                        "item_features id or both, and the items' interest table")
            self.interest_emb = nn.Embedding(n_interests + 1, id_dim, padding_idx=n_interests)
            nn.init.normal_(self.interest_emb.weight[:n_interests], std=0.02)
            # frozen data, rebuilt from the dataset with the trained vocabulary (items appended later included)
            self.register_buffer("interests", interests.long(), persistent=False)
            self.register_buffer("interest_count", (interests < n_interests).sum(1, keepdim=True).float(),
                                 persistent=False)
        self.out_dim = (content.shape[1] if self.use_content else 0) + (id_dim if self.use_id else 0)
        # unit-norm content vectors and small-init ID embeddings live on very different scales; normalise the
        # concatenation so that neither (nor the action/time features beside it) dominates the projection
        self.norm = nn.LayerNorm(self.out_dim)

    def raw(self, item: torch.Tensor, id_dropout: float = 0.0) -> torch.Tensor:
        """The concatenation before the LayerNorm; id_dropout: the probability of leaving an item's ID embedding
        out (items with interests only)."""
        parts = []
        if self.use_content:
            parts.append(self.content[item])
        if self.use_id:
            e = self.id_emb(item)
            if self.use_interests:
                count = self.interest_count[item]  # [..., 1]
                if id_dropout > 0:
                    e = e * ~((count > 0) & (torch.rand(count.shape, device=e.device) < id_dropout))
                # the mean over the item's interests (zero for an item without any)
                e = e + self.interest_emb(self.interests[item]).sum(-2) / count.clamp(min=1)
            parts.append(e)
        return torch.cat(parts, dim=-1)

    def forward(self, item: torch.Tensor, id_dropout: float = 0.0) -> torch.Tensor:
        return self.norm(self.raw(item, id_dropout))


@functools.lru_cache(maxsize=16)
def prefix_low_pass(T: int, cutoff: int) -> torch.Tensor:
    """[T, T] lower-triangular L: (L @ x)[t] is the low-pass of the prefix x[0..t] at its last element — the signal
    of length t+1 through its real DFT, the frequencies cutoff and above set to zero, and back (BSARec's filter,
    taken over each prefix rather than the whole window, so that every position sees only its past)."""
    L = torch.zeros(T, T, dtype=torch.float64)
    for n in range(1, T + 1):
        spectrum = torch.fft.rfft(torch.eye(n, dtype=torch.float64), dim=0)  # column j: the DFT of the unit pulse e_j
        spectrum[cutoff:] = 0
        L[n - 1, :n] = torch.fft.irfft(spectrum, n=n, dim=0)[n - 1]
    return L.float()


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)), causal self-attention. gated: x +
    σ(G_a·LN(x)) ⊙ Attn(LN(x)), then x + σ(G_f·LN(x)) ⊙ SwiGLU(LN(x)), SwiGLU(h) = W_o(silu(W_g h) ⊙ W_u h)."""

    def __init__(self, width: int, heads: int, dropout: float, ffn_mult: int = 4, gated: bool = False,
                 frequency_mix: float = 0.0, frequency_cutoff: int = 5, max_len: int = 64):
        super().__init__()
        self.heads, self.dropout, self.gated = heads, dropout, gated
        self.frequency_mix, self.frequency_cutoff = frequency_mix, frequency_cutoff
        if frequency_mix:
            self.sqrt_beta = nn.Parameter(torch.ones(width))  # β per channel; 1: the input passes unfiltered
            # built once, moved with the module (no host copy per forward, nothing for a compiled graph to rebuild);
            # row t depends on t only, so [:T, :T] serves any shorter input; not saved (a function of the config)
            self.register_buffer("low_pass", prefix_low_pass(max_len, frequency_cutoff).clone(), persistent=False)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        if gated:
            self.gate_attn, self.gate_ffn = nn.Linear(width, width), nn.Linear(width, width)
            self.ffn_gate_up = nn.Linear(width, 2 * ffn_mult * width)
            self.ffn_out = nn.Linear(ffn_mult * width, width)
        else:
            self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))
        self.drop = nn.Dropout(dropout)

    def _attn_branch(self, a: torch.Tensor, h: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        """The attention branch's output from the heads' concatenated output a and the normalised input h, mixed
        with the frequency branch (low: h's low-pass at the same positions) when the block has one."""
        o = self.proj(a)
        o = o * torch.sigmoid(self.gate_attn(h)) if self.gated else o
        if not self.frequency_mix:
            return o
        filtered = (low + self.sqrt_beta.square() * (h - low)).to(o.dtype)  # keep the residual stream's dtype
        return self.frequency_mix * filtered + (1 - self.frequency_mix) * o

    def _low_pass(self, T: int) -> torch.Tensor:
        """[T, T] the causal low-pass (`prefix_low_pass`); built on the fly only for inputs longer than max_len."""
        if T <= self.low_pass.shape[0]:
            return self.low_pass[:T, :T]
        return prefix_low_pass(T, self.frequency_cutoff).to(self.low_pass.device)

    def _ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln2(x)
        if not self.gated:
            return self.ffn(h)
        g, u = self.ffn_gate_up(h).chunk(2, dim=-1)
        return self.ffn_out(F.silu(g) * u) * torch.sigmoid(self.gate_ffn(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        low = self._low_pass(T).to(h.dtype) @ h if self.frequency_mix else None
        x = x + self.drop(self._attn_branch(a.transpose(1, 2).reshape(B, T, H), h, low))
        return x + self.drop(self._ffn_branch(x))

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """forward(x)[b, pos[b]] for each row b, [B, H], without the work no other position needs: keys and values
        at every position, but the query, attention, output projection and MLP at pos only (for inference).
        For the newest position of `paper`'s last block that skips ~85% of the block's FLOPs."""
        B, T, H = x.shape
        h = self.ln1(x)
        w_q, w_kv = self.qkv.weight.split([H, 2 * H])
        b_q, b_kv = self.qkv.bias.split([H, 2 * H])
        k, v = F.linear(h, w_kv, b_kv).view(B, T, 2, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        rows = torch.arange(B, device=x.device)
        q = F.linear(h[rows, pos], w_q, b_q).view(B, self.heads, 1, H // self.heads)
        visible = torch.arange(T, device=x.device).unsqueeze(0) <= pos.unsqueeze(1)  # the causal row of pos
        # attention for the one query, written out: the fused CPU kernel's result for a row depended (in the last
        # bit, on several threads) on which other rows shared the batch, and the daily job's carry-over relies on a
        # user's vector being the same whatever the batch
        scores = (q @ k.transpose(-2, -1)) * (H // self.heads) ** -0.5  # [B, heads, 1, T]
        weights = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1)
        a = F.dropout(weights, self.dropout, self.training) @ v
        low = (self._low_pass(T).to(h.dtype)[pos].unsqueeze(1) @ h).squeeze(1) if self.frequency_mix else None
        x = x[rows, pos] + self.drop(self._attn_branch(a.reshape(B, H), h[rows, pos], low))
        return x + self.drop(self._ffn_branch(x))


class PinnerFormer(nn.Module):
    def __init__(self, cfg: PinnerFormerConfig, spec: InputSpec, content: torch.Tensor | None = None,
                 interests: torch.Tensor | None = None):
        """content: [n_items, spec.content_dim] item content vectors, needed when the item features use them;
        interests: [n_items, K] each item's interests as indexes into spec.interests (len(spec.interests): none),
        needed when spec.interests is not empty (`interest_table`)."""
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.item_feature_kind = cfg.item_features if cfg.item_features != "auto" else (
            "both" if spec.content_dim else "id")
        self.time_features = cfg.time_features and spec.has_clock
        self.items = ItemFeatures(self.item_feature_kind, spec.n_items, cfg.id_dim, content,
                                  len(spec.interests), interests)
        self.action_emb = nn.Embedding(spec.n_actions + 1, cfg.action_dim)  # 0 = unknown
        self.surface_emb = nn.Embedding(spec.n_surfaces + 1, cfg.surface_dim)  # 0 = unknown / not recorded
        in_dim = self.items.out_dim + (cfg.action_dim if cfg.action_features else 0) + \
            (cfg.surface_dim + 2 if cfg.duration_surface_features else 0)
        if self.time_features:
            self.t_abs = Time2Vec(ABS_PERIODS, with_log=True)  # x = days since epoch
            self.t_since = Time2Vec(REL_PERIODS, with_log=True)
            self.t_gap = Time2Vec(REL_PERIODS, with_log=True)
            in_dim += self.t_abs.out_dim + self.t_since.out_dim + self.t_gap.out_dim
        self.input_proj = nn.Linear(in_dim, cfg.width)
        self.pos_emb = nn.Embedding(spec.max_len, cfg.width)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(cfg.width, cfg.heads, cfg.dropout, cfg.ffn_mult, cfg.block == "gated",
                                           cfg.frequency_mix, cfg.frequency_cutoff, spec.max_len)
                                     for _ in range(cfg.layers)])
        if cfg.head == "mlp":
            self.head = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(),
                                      nn.Linear(4 * cfg.width, cfg.dim))
        else:
            self.head = nn.Sequential(nn.LayerNorm(cfg.width),
                                      *([nn.Linear(cfg.width, cfg.dim)] if cfg.width != cfg.dim else []))
        self.drop_in = nn.Dropout(cfg.input_dropout)
        if cfg.item_tower == "mlp":
            self.item_tower = nn.Sequential(nn.Linear(self.items.out_dim, cfg.item_tower_hidden), nn.GELU(),
                                            nn.Linear(cfg.item_tower_hidden, cfg.dim))
        elif cfg.item_tower == "linear":
            self.item_tower = nn.Linear(self.items.out_dim, cfg.dim)
        else:  # none
            if self.items.out_dim != cfg.dim:
                raise PinnerformerError(
                    f"model.item_tower=none uses the item features as item embeddings, so their width "
                    f"({self.items.out_dim}: item_features={self.item_feature_kind}) must equal model.dim ({cfg.dim})")
            self.item_tower = nn.Identity()
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))

    @property
    def temperature(self) -> torch.Tensor:
        if self.cfg.score == "dot":
            return torch.ones((), device=self.log_tau.device)
        return self.log_tau.exp().clamp(min=0.01)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        """An embedding as scored: L2-normalised (cosine) or as is (dot); float32 either way."""
        return F.normalize(x.float(), dim=-1) if self.cfg.score == "cosine" else x.float()

    def action_features(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.items(b["item"], self.cfg.id_dropout if self.training else 0.0)]
        if self.cfg.action_features:
            parts.append(self.action_emb(b["action"] + 1))
        if self.cfg.duration_surface_features:
            dur = b["duration"]
            missing = torch.isnan(dur)
            log_dur = torch.where(missing, torch.zeros_like(dur), torch.log1p(dur.clamp(min=0)))
            parts += [self.surface_emb(b["surface"] + 1), log_dur.unsqueeze(-1), missing.float().unsqueeze(-1)]
        if self.time_features:
            parts += [self.t_abs(b["t_abs_days"], frac=b["t_abs_frac"]), self.t_since(b["t_since"]),
                      self.t_gap(b["t_gap"])]
        return torch.cat(parts, dim=-1)

    def block_inputs(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T] actions (right-padded) -> [B, T, H] inputs of the first transformer block."""
        x = self.input_proj(self.action_features(b))
        T = x.shape[1]
        if self.cfg.position_features:
            index = torch.arange(T, device=x.device)
            if self.cfg.position_from == "newest":  # [B, T]: distance from each row's newest action (padding: 0)
                index = (b["length"].to(x.device).unsqueeze(1) - 1 - index).clamp(min=0)
            x = x + self.pos_emb(index.clamp(max=self.spec.max_len - 1))
        x = self.drop_in(x)
        # the sum above is float32 (the position table is); the blocks keep whatever dtype they are given
        if self.cfg.residual_dtype == "compute" and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def hidden_states(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T] actions (right-padded) -> [B, T, H] transformer outputs, causal at every position."""
        x = self.block_inputs(b)
        for block in self.blocks:
            x = block(x)
        return x

    def user_state(self, b: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H]: hidden_states(b) at each row's newest position (length - 1; or at `positions` [B]), with the
        last block computing that position only (`Block.forward_at`): what inference needs, for ~1/L less work."""
        x = self.block_inputs(b)
        newest = b["length"] - 1 if positions is None else positions
        if not len(self.blocks):
            return x[torch.arange(x.shape[0], device=x.device), newest]
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].forward_at(x, newest)

    def encode_sequence(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T, D] embeddings at every position (training: every position is a query), L2-normalised for cosine."""
        return self._out(self.head(self.hidden_states(b)))

    def user_embedding(self, b: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
        """The newest position's embedding (or at `positions` [B]), [B, D]: the last block and the head run on
        that position only (inference; equal to encode_sequence(b) there, to float rounding)."""
        return self._out(self.head(self.user_state(b, positions)))

    def item_embedding(self, item: torch.Tensor) -> torch.Tensor:
        if self.cfg.score == "dot" and self.cfg.item_tower == "none":
            # the table itself, as SASRec scores: after the LayerNorm every item would have about the same norm
            return self.items.raw(item).float()
        return self._out(self.item_tower(self.items(item, self.cfg.target_id_dropout if self.training else 0.0)))

    @torch.no_grad()
    def grow(self, n_items: int, n_surfaces: int) -> None:
        """Serve a dataset grown by appends (ids keep their indexes, new ones come after): an item the model never
        saw is read through its content vector where the item features use one, and through an explicit
        unknown-item ID embedding, the mean of the trained ones (the same for every new item, so its vector does
        not depend on how many arrived); a new surface reads as the reserved unknown one."""
        if n_items > self.spec.n_items and self.items.use_id:
            w = self.items.id_emb.weight
            unknown = w.mean(0, keepdim=True).expand(n_items - w.shape[0], -1)
            self.items.id_emb = nn.Embedding.from_pretrained(torch.cat([w, unknown]), freeze=False)
        if n_surfaces > self.spec.n_surfaces:
            w = self.surface_emb.weight
            self.surface_emb = nn.Embedding.from_pretrained(
                torch.cat([w, w[:1].expand(n_surfaces - self.spec.n_surfaces, -1)]), freeze=False)
        self.spec = replace(self.spec, n_items=max(n_items, self.spec.n_items),
                            n_surfaces=max(n_surfaces, self.spec.n_surfaces))

    @property
    def out_dim(self) -> int:
        """The width of user and item embeddings."""
        return self.cfg.dim


class PinnerFormerEnsemble(nn.Module):
    """K PinnerFormers (`model.members`) with different initial weights, trained side by side on the same batches,
    each with its own loss (`members`: the training task computes one loss per member and averages them), so they
    stay independent models whose errors partly cancel. Scored together as one embedding model: a user's vector is
    the members' vectors concatenated, an item's likewise, so one inner product is the sum of the members' scores —
    divided by K for cosine members, whose concatenation is then unit length again (score = the members' mean
    cosine; members' temperatures are not applied: they rank each member alone)."""

    def __init__(self, cfg: PinnerFormerConfig, spec: InputSpec, content: torch.Tensor | None = None,
                 interests: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        one = cfg.model_copy(update={"members": 1})
        self.members = nn.ModuleList([PinnerFormer(one, spec, content, interests) for _ in range(cfg.members)])
        self.scale = cfg.members ** -0.5 if cfg.score == "cosine" else 1.0

    @property
    def spec(self) -> InputSpec:
        return self.members[0].spec

    @property
    def time_features(self) -> bool:
        return self.members[0].time_features

    @property
    def item_feature_kind(self) -> str:
        return self.members[0].item_feature_kind

    @property
    def items(self) -> ItemFeatures:
        return self.members[0].items

    @property
    def out_dim(self) -> int:
        return self.cfg.members * self.cfg.dim

    @property
    def temperature(self) -> torch.Tensor:
        """The members' mean temperature (for the training log)."""
        return torch.stack([m.temperature for m in self.members]).mean()

    def user_embedding(self, b: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([m.user_embedding(b, positions) for m in self.members], dim=-1) * self.scale

    def item_embedding(self, item: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.item_embedding(item) for m in self.members], dim=-1) * self.scale

    @torch.no_grad()
    def grow(self, n_items: int, n_surfaces: int) -> None:
        for m in self.members:
            m.grow(n_items, n_surfaces)


def members_of(model: nn.Module) -> list[PinnerFormer]:
    """The PinnerFormers that make up a model: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, PinnerFormerEnsemble) else [model]


def interest_vocabulary(ds: Dataset, cfg: PinnerFormerConfig) -> tuple[str, ...]:
    """The interests the model learns embeddings for (sorted), or () when it uses none."""
    if cfg.item_interests == "off":
        return ()
    vocab = tuple(sorted(set(ds.items["interests"].explode().drop_nulls().to_list())))
    id_part = cfg.item_features != "content"  # auto always has one
    if cfg.item_interests == "on":
        if not vocab:
            raise PinnerformerError(f"model.item_interests=on needs item interests, but the items of {ds.path} have "
                                    "none (use item_interests=auto or off)")
        if not id_part:
            raise PinnerformerError(f"model.item_interests=on adds to the item-ID embedding, but "
                                    f"item_features={cfg.item_features} has none (use id or both)")
    return vocab if id_part else ()


def interest_table(ds: Dataset, vocabulary: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """[n_items, K] each item's interests as indexes into `vocabulary` (len(vocabulary) pads), and how many of the
    items' interests the vocabulary lacks (interests first seen in data appended after training: not read)."""
    index = {name: i for i, name in enumerate(vocabulary)}
    per_item = ds.items.sort("item")["interests"].to_list()
    k = max(1, max((len(x) for x in per_item if x), default=1))
    table = np.full((len(per_item), k), len(vocabulary), np.int64)
    unknown = 0
    for i, names in enumerate(per_item):
        known = [index[n] for n in dict.fromkeys(names or ()) if n in index]
        unknown += len(set(names or ())) - len(known)
        table[i, :len(known)] = known
    return torch.from_numpy(table), unknown


def input_spec(ds: Dataset, max_len: int, cfg: PinnerFormerConfig | None = None) -> InputSpec:
    m = ds.manifest
    return InputSpec(n_items=m.n_items, n_actions=len(m.actions), n_surfaces=len(m.surfaces), max_len=max_len,
                     content_dim=m.content_vectors.dim if m.content_vectors else 0, has_clock=m.clock == "seconds",
                     interests=interest_vocabulary(ds, cfg) if cfg is not None else ())


def content_for(ds: Dataset, cfg: PinnerFormerConfig) -> torch.Tensor | None:
    """The dataset's item content vectors when the item features use them (None otherwise)."""
    kind, has = cfg.item_features, ds.manifest.content_vectors is not None
    if kind in ("content", "both") and not has:
        raise PinnerformerError(f"item_features={kind} needs content vectors, but {ds.path} has none "
                                "(run `pinnerformer items embed-text` or use item_features=id)")
    uses_content = kind in ("content", "both") or (kind == "auto" and has)
    return torch.from_numpy(np.array(ds.content_vectors())) if uses_content else None


def pinnerformer_for(ds: Dataset, cfg: PinnerFormerConfig, max_len: int, spec: InputSpec | None = None
                     ) -> PinnerFormer | PinnerFormerEnsemble:
    """A PinnerFormer (or an ensemble of `cfg.members`) for a dataset's vocabulary (or the trained `spec`: a run's
    model on its dataset or one grown from it), with its content vectors and interests when the features use them."""
    spec = spec or input_spec(ds, max_len, cfg)
    interests = interest_table(ds, spec.interests)[0] if spec.interests else None
    kind = PinnerFormerEnsemble if cfg.members > 1 else PinnerFormer
    return kind(cfg, spec, content_for(ds, cfg), interests)
