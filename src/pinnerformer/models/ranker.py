"""The end-to-end ranker (TransAct paper, Xia et al., KDD 2023, arXiv:2306.00248, Fig. 1): pointwise, one logit per head (save, like, hide, ...).

Input of one candidate row, concatenated into x0:
    candidate      its frozen item vector projected to `item_dim` (content vector or PinnerFormer item vector),
                   and a learned item-ID embedding (`item_id_dim`, 0 = none)
    user           a learned user-ID embedding (`user_id_dim`, 0 = none): one row per user with training rows, one
                   shared row for every other user (new, or only in later periods), which training also fills by
                   dropping a request's user to it with probability `user_id_dropout`; crossed with the candidate's
                   ID and vector, the matrix-factorisation signal (Koren et al., IEEE Computer 2009) trees on
                   counters cannot form
    PinnerFormer   the user's vector from the day before's snapshot, its dot product with the candidate's
                   PinnerFormer item vector (the retrieval score), and whether the user had a vector at all
    sequence       `sequence`: none | average (mean of the sequence's [action ‖ item] tokens, BST-less baseline)
                   | bst (the candidate appended as one more token, learned positions: Behavior Sequence
                   Transformer style) | transact (early fusion concat, time-window mask: `models/transact.py`)
                   | transact-v2 (lifelong, realtime and impression streams cut per candidate to its nearest
                   tokens over int8 item vectors: `models/transact_v2.py`)
    context        the request's UTC hour and surface, embedded
    counters       the candidate row's point-in-time features (`features/point_in_time.py`: item, user, user x item,
                   user x interest counters and rates, recency, the candidate against the realtime sequence, ...),
                   standardised with the training rows' mean and deviation (buffers) and clipped to +-5; with
                   `feature_bins` T > 0 each also as its piecewise-linear encoding over T quantile bins of the
                   training rows (Gorishniy et al., NeurIPS 2022, arXiv:2203.05556):
                       ple_t(x) = clamp((x - e_t) / (e_{t+1} - e_t), 0, 1),  t = 0 .. T-1
                   so the network sees the thresholds trees split on, not only a line through them
Feature crossing (DCN v2, Wang et al. 2021, parallel form): a cross network of `cross_layers` full-rank layers
    x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l
beside an MLP on x0; [x_L ‖ MLP(x0)] -> one logit per head.

The frozen vectors are buffers of the module (saved with it, never trained), so a checkpoint scores on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.features.rank_batch import RankBatch
from pinnerformer.models.transact import TransAct, TransActConfig
from pinnerformer.models.transact_v2 import Stream, TransActV2, TransActV2Config, select
from pinnerformer.ops.quantize import DEFAULT_TABLE_DIM, Int8Vectors, dequantize_normalize, int8_table


class RankerConfig(StrictModel):
    sequence: Literal["none", "average", "bst", "transact", "transact-v2"] = "transact"
    transact: TransActConfig = TransActConfig()
    v2: TransActV2Config = TransActV2Config()  # sequence "transact-v2": lifelong streams, NN selection
    use_pinnerformer: bool = True
    features: bool = True  # the point-in-time features beside the sequence (their definition: the run's `features`)
    item_dim: int = Field(32, ge=1)
    item_id_dim: int = Field(16, ge=0)
    user_id_dim: int = Field(0, ge=0)
    user_id_dropout: float = Field(0.2, ge=0, lt=1)
    # the sequence module's output (TransAct: (K + 1)·d = 1056 values) projected to this width before it meets the
    # features (0: as it is); narrow, so that the sequence does not swamp the counters beside it
    sequence_dim: int = Field(0, ge=0)
    context_dim: int = Field(8, ge=1)
    feature_bins: int = Field(0, ge=0, le=64)  # > 0: the piecewise-linear encoding of each feature beside it
    cross_layers: int = Field(3, ge=0)
    # low-rank cross layers (U V^T of this rank; 0: full rank) where the input is at least 4x as wide: with TransAct's
    # 1,056 outputs beside the features, full-rank layers were 5.2 M parameters that overfit in one epoch
    cross_rank: int = Field(64, ge=0)
    mlp: list[int] = [256, 128]
    dropout: float = Field(0.1, ge=0, lt=1)


@dataclass(frozen=True)
class RankerInputs:
    """What the ranking data fixes about the model."""

    n_items: int
    n_actions: int
    n_surfaces: int
    vector_dim: int  # frozen item vectors (sequence and candidate)
    pf_dim: int  # PinnerFormer user / item vectors
    heads: tuple[str, ...]
    positive_actions: tuple[int, ...] = ()  # action codes the next-action loss predicts (TransAct V2)
    feature_names: tuple[str, ...] = ()  # the point-in-time features the model reads, in order
    n_users: int = 0  # user codes of the ranking data (the user-ID embedding's rows, besides the shared one)


class CrossNetwork(nn.Module):
    """DCN v2's cross network: x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l, with W_l full rank or, given a rank r and an
    input at least 4·r wide, the paper's low-rank form W_l = U_l V_l^T (d·d parameters a layer become 2·d·r: a wide
    sequence output keeps its products with the candidate without a full d x d matrix to overfit)."""

    def __init__(self, d: int, layers: int, rank: int = 0):
        super().__init__()
        if rank and 4 * rank <= d:
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, d))
                                         for _ in range(layers)])
        else:
            self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w in self.layers:
            x = x0 * w(x) + x
        return x


def piecewise_linear(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """[N, F] values, [F, T + 1] bin edges -> [N, F, T]: how far each value is through each bin (0 below it, 1 above
    it). A bin of zero width (a value most rows share) is a step at its edge."""
    lo, hi = edges[:, :-1], edges[:, 1:]
    return ((x.unsqueeze(-1) - lo) / (hi - lo).clamp(min=1e-6)).clamp(0.0, 1.0)


def sequence_variant(cfg: RankerConfig) -> TransActConfig:
    """The sequence module's configuration for the chosen variant (bst: append fusion, positions, no mask)."""
    if cfg.sequence == "bst":
        return cfg.transact.model_copy(update={"fusion": "append", "positional": True, "time_window_hours": 0.0})
    return cfg.transact


class Ranker(nn.Module):
    def __init__(self, cfg: RankerConfig, inputs: RankerInputs, item_vectors: torch.Tensor,
                 pf_item_vectors: torch.Tensor, int8: Int8Vectors | None = None):
        super().__init__()
        self.cfg, self.inputs = cfg, inputs
        self.register_buffer("item_vectors", item_vectors.float().contiguous())  # frozen [I, E]
        self.register_buffer("pf_items", pf_item_vectors.float().contiguous())  # frozen [I, D]
        self.cand_proj = nn.Linear(inputs.vector_dim, cfg.item_dim)
        self.item_id = nn.Embedding(inputs.n_items, cfg.item_id_dim) if cfg.item_id_dim else None
        self.user_id = None
        if cfg.user_id_dim and inputs.n_users:
            self.user_id = nn.Embedding(inputs.n_users + 1, cfg.user_id_dim)  # row 0: every user without a row
            nn.init.normal_(self.user_id.weight, std=0.01)
            # which users have a learned row (set from the training rows: `set_user_rows`); the others read row 0
            self.register_buffer("user_has_row", torch.zeros(inputs.n_users + 1, dtype=torch.bool))
        self.hour = nn.Embedding(24, cfg.context_dim)
        self.surface = nn.Embedding(inputs.n_surfaces + 1, cfg.context_dim)
        d = cfg.item_dim + cfg.item_id_dim + 2 * cfg.context_dim + (cfg.user_id_dim if self.user_id else 0)
        if cfg.use_pinnerformer:
            d += inputs.pf_dim + 2
        F = len(inputs.feature_names)
        self.register_buffer("feature_mean", torch.zeros(F))  # set from the training rows (`set_feature_scale`)
        self.register_buffer("feature_std", torch.ones(F))
        d += F
        if cfg.feature_bins and F:
            self.register_buffer("feature_edges", torch.zeros(F, cfg.feature_bins + 1))  # quantiles of the training rows
            d += F * cfg.feature_bins
        self.transact = None
        if cfg.sequence in ("transact", "bst"):
            self.transact = TransAct(sequence_variant(cfg), inputs.n_actions, inputs.vector_dim)
            d += self.transact.out_dim
        self.seq_proj = None
        if cfg.sequence_dim and cfg.sequence in ("transact", "bst"):
            d += cfg.sequence_dim - self.transact.out_dim
            self.seq_proj = nn.Sequential(nn.Linear(self.transact.out_dim, cfg.sequence_dim), nn.ReLU())
        elif cfg.sequence == "transact-v2":
            # the frozen item vectors as int8 with one affine map (the ranking data's stored table, or built here from
            # item_vectors); saved with the model: q, scale, zero point
            if int8 is None:
                int8 = int8_table(item_vectors.float().numpy(), DEFAULT_TABLE_DIM)
            if len(int8.q) != inputs.n_items:
                raise ValueError(f"the int8 item table has {len(int8.q)} rows for {inputs.n_items} items")
            width = int8.q.shape[1]
            self.register_buffer("item_q", torch.from_numpy(np.array(int8.q)))
            self.register_buffer("q_affine", torch.tensor([int8.scale, int8.zero], dtype=torch.float64))
            self.v2 = TransActV2(cfg.v2, inputs.n_actions, inputs.n_surfaces, width)
            d += cfg.v2.out_dim
        elif cfg.sequence == "average":
            self.avg_action = nn.Embedding(inputs.n_actions + 1, cfg.transact.action_dim)
            self.avg_item = nn.Linear(inputs.vector_dim, cfg.transact.item_dim)
            d += cfg.transact.action_dim + cfg.transact.item_dim
        self.x0_dim = d
        self.collect_next_action = False  # set by a training task that adds the next-action loss
        self.feature_config = None  # the point-in-time features' definition (set by `training.ranking.ranker_for`)
        self.next_action_inputs: dict[str, torch.Tensor] | None = None
        self.cross = CrossNetwork(d, cfg.cross_layers, cfg.cross_rank)
        mlp, width = [], d
        for h in cfg.mlp:
            mlp += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        self.mlp = nn.Sequential(*mlp)
        self.head = nn.Linear(d + width, len(inputs.heads))

    def set_feature_scale(self, values: np.ndarray) -> None:
        """Standardise the features with these rows' mean and deviation (the training rows')."""
        v = torch.as_tensor(np.asarray(values, np.float64))
        self.feature_mean.copy_(v.mean(0).float())
        self.feature_std.copy_(v.std(0).clamp(min=1e-6).float())
        if hasattr(self, "feature_edges"):
            q = np.linspace(0.0, 1.0, self.cfg.feature_bins + 1)
            self.feature_edges.copy_(torch.from_numpy(np.quantile(v.numpy(), q, axis=0).T.copy()).float())

    def set_user_rows(self, users: np.ndarray) -> None:
        """The users (codes) whose rows training learns: those of the training rows."""
        if self.user_id is not None:
            self.user_has_row.zero_()
            self.user_has_row[torch.as_tensor(np.unique(np.asarray(users, np.int64))) + 1] = True

    def user_rows(self, b: RankBatch) -> torch.Tensor:
        """[R] each request's row of the user-ID table (0: the shared row)."""
        R = len(b.hour)
        if b.user is None:
            return torch.zeros(R, dtype=torch.long, device=b.hour.device)
        code = b.user + 1
        known = (code > 0) & (code < len(self.user_has_row))
        code = torch.where(known, code, torch.zeros_like(code))
        code = torch.where(self.user_has_row[code], code, torch.zeros_like(code))
        if self.training and self.cfg.user_id_dropout:
            code = torch.where(torch.rand(R, device=code.device) < self.cfg.user_id_dropout,
                               torch.zeros_like(code), code)
        return code

    def v2_selection(self, b: RankBatch) -> tuple[torch.Tensor, ...]:
        """Rows grouped by request (their streams are moved and dequantised once per request): the grouping order
        [N], each row's selected tokens (item [N, T], actions, surface, real, in that order) and candidate unit
        vectors."""
        if b.streams is None:
            raise ValueError("a transact-v2 ranker needs the batch's streams (build_rank_batch(..., v2=spec))")
        order = torch.argsort(b.row_request, stable=True)
        counts = torch.bincount(b.row_request, minlength=len(b.hour))
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        st = {name: Stream(b.streams[f"{name}.item"], b.streams[f"{name}.actions"],
                           b.streams[f"{name}.surface"], b.streams[f"{name}.valid"])
              for name in ("lifelong", "realtime", "impressions")}
        scale, zero = float(self.q_affine[0]), int(self.q_affine[1])
        cand = dequantize_normalize(self.item_q[b.cand_item[order]], scale, zero)  # the candidate as the table has it
        return (order, *select(self.cfg.v2, self.item_q, scale, zero, st["lifelong"], st["realtime"],
                               st["impressions"], offsets, cand), cand)

    def selected_items(self, b: RankBatch) -> torch.Tensor:
        """[N, T] the items of each row's selected tokens, in row order (-1: padding): what the paper logs per
        training example instead of the sequences."""
        order, item, _, _, real, _ = self.v2_selection(b)
        return torch.empty_like(item).index_copy_(0, order, torch.where(real, item, torch.full_like(item, -1)))

    def v2_features(self, b: RankBatch) -> torch.Tensor:
        """Each candidate's nearest tokens selected and encoded, in row order."""
        order, item, actions, surface, real, cand = self.v2_selection(b)
        scale, zero = float(self.q_affine[0]), int(self.q_affine[1])
        unit = dequantize_normalize(self.item_q[item], scale, zero)
        collect = self.training and self.collect_next_action
        out = self.v2(unit, actions, surface.clamp(max=self.inputs.n_surfaces), real, cand, return_states=collect)
        if collect:
            out, states = out
            self.next_action_inputs = self.next_action_inputs_from(states, unit, actions, real)
        return torch.empty_like(out).index_copy_(0, order, out)

    def next_action_inputs_from(self, states: torch.Tensor, unit: torch.Tensor, actions: torch.Tensor,
                                real: torch.Tensor) -> dict[str, torch.Tensor]:
        """The next-action loss's inputs: each of the newest realtime tokens in S (time order) predicts the item of
        the next one when that is a positive action; negatives are the row's selected impressions."""
        c = self.cfg.v2
        a, n = c.k_lifelong, c.recent
        positive = torch.zeros(actions.shape[-1], dtype=torch.bool, device=actions.device)
        positive[list(self.inputs.positive_actions)] = True
        nxt = slice(a + 1, a + n)
        has_next = real[:, a:a + n - 1] & real[:, nxt] & (actions[:, nxt][..., positive].sum(-1) > 0)
        rows, cols = torch.nonzero(has_next, as_tuple=True)
        imp = slice(a + n + c.k_realtime, a + n + c.k_realtime + c.k_impressions)
        return {"query": self.v2.next_action(states[:, a:a + n - 1][rows, cols]),
                "target": unit[:, nxt][rows, cols], "negatives": unit[:, imp][rows], "neg_valid": real[:, imp][rows],
                "positions": torch.tensor(int(real[:, a:a + n - 1].sum()))}

    def sequence_features(self, b: RankBatch, cand_vec: torch.Tensor, shared_projection: bool) -> torch.Tensor:
        r = b.row_request
        if self.cfg.sequence == "transact-v2":
            return self.v2_features(b)
        if self.cfg.sequence == "average":
            tok = torch.cat([self.avg_action(b.seq_action), self.avg_item(self.item_vectors[b.seq_item])], -1)
            real = (b.seq_action > 0).unsqueeze(-1).float()
            return ((tok * real).sum(1) / real.sum(1).clamp(min=1))[r]
        L = self.transact.cfg.seq_len
        action, item, age = b.seq_action[:, :L], b.seq_item[:, :L], b.seq_age[:, :L]
        if shared_projection and not self.training:
            # request by request: the sequence part of the first projection once per request (W_s·s + W_c·c)
            out = torch.empty(len(r), self.transact.out_dim, device=cand_vec.device)
            for q in range(len(action)):
                rows = torch.nonzero(r == q).squeeze(1)
                if len(rows):
                    out[rows] = self.transact.forward_request(action[q], self.item_vectors[item[q]], age[q],
                                                              cand_vec[rows])
            return out
        return self.transact(action[r], self.item_vectors[item[r]], age[r], cand_vec)

    def forward(self, b: RankBatch, shared_projection: bool = False) -> torch.Tensor:
        """[N, heads] logits for the batch's candidate rows."""
        r = b.row_request
        cand_vec = self.item_vectors[b.cand_item]
        parts = [self.cand_proj(cand_vec)]
        if self.item_id is not None:
            parts.append(self.item_id(b.cand_item))
        if self.user_id is not None:
            parts.append(self.user_id(self.user_rows(b))[r])
        if self.cfg.use_pinnerformer:
            u = b.user_vec[r]
            score = (u * self.pf_items[b.cand_item]).sum(-1, keepdim=True)
            parts += [u, score, b.has_vector[r].float().unsqueeze(1)]
        if self.cfg.sequence != "none":
            seq = self.sequence_features(b, cand_vec, shared_projection)
            parts.append(seq if self.seq_proj is None else self.seq_proj(seq))
        parts += [self.hour(b.hour[r]), self.surface(b.surface[r])]
        if len(self.inputs.feature_names):
            if b.features is None:
                raise ValueError("this ranker reads point-in-time features: build the batch with them")
            parts.append(((b.features - self.feature_mean) / self.feature_std).clamp(-5, 5))
            if hasattr(self, "feature_edges"):
                parts.append(piecewise_linear(b.features, self.feature_edges).flatten(1))
        x0 = torch.cat(parts, -1)
        return self.head(torch.cat([self.cross(x0), self.mlp(x0)], -1))
