"""The ranking counterpart of the scorer: the candidates of a set of requests scored per head by a ranker or by a
baseline (random order, popularity, the PinnerFormer score alone), and the metrics of `ranking_metrics` per head,
with intervals and paired lifts. Validation during training and `pinnerformer rank evaluate` both use it.
"""

from __future__ import annotations

import numpy as np
import torch

from pinnerformer.config import StrictModel
from pinnerformer.data.requests import Head, RankData
from pinnerformer.data.timelines import Timelines
from pinnerformer.evaluation import ranking_metrics as rm
from pinnerformer.features.point_in_time import FeatureConfig
from pinnerformer.features.rank_batch import build_rank_batch, pf_visible
from pinnerformer.features.rank_features import rank_features
from pinnerformer.features.v2_streams import StreamSpec, stream_spec
from pinnerformer.models.ranker import Ranker

BASELINES = ["random", "popularity", "item-rate", "item-value", "pinnerformer"]


def v2_spec_for(model: Ranker, rd: RankData, action_names: list[str], positive: list[int]) -> StreamSpec | None:
    """The streams a transact-v2 ranker reads (None for the other sequence features)."""
    if model.cfg.sequence != "transact-v2":
        return None
    c = model.cfg.v2
    return stream_spec(action_names, positive, [h.actions for h in rd.heads], c.realtime_len, c.lifelong_max,
                       c.impressions_max)


@torch.no_grad()
def score_requests(model: Ranker, rd: RankData, tl: Timelines, requests: np.ndarray, device: torch.device,
                   chunk: int = 64, shared_projection: bool = False, v2: StreamSpec | None = None) -> np.ndarray:
    """[rows of `RankData.candidate_rows`, heads] probabilities."""
    model.eval()
    seq_len = model.transact.cfg.seq_len if model.transact is not None else model.cfg.transact.seq_len
    features = rank_features(rd, model.feature_config).values if len(model.inputs.feature_names) else None
    out = []
    for i in range(0, len(requests), chunk):
        b = build_rank_batch(rd, tl, requests[i:i + chunk], seq_len, v2=v2, features=features).staged(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(torch.sigmoid(model(b, shared_projection=shared_projection).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(rd.heads)), np.float32)


def baseline_scores(kind: str, rd: RankData, requests: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """[rows, heads] scores of a baseline: `random`; `popularity` (per head, how often the item was engaged with
    that head in the requests before the validation period: feature and training periods); `item-rate` (per head,
    the item's smoothed rate of the head's actions among all its events before the request: point in time);
    `item-value` (the item's smoothed mean value before the request, e.g. its mean rating; None where the data has
    no numbers); `pinnerformer` (the user's vector of the day before · the item's PinnerFormer vector). A goodness
    score (pinnerformer, item-value) is negated for negative heads."""
    rows, _ = rd.candidate_rows(requests)
    H = len(rd.heads)
    if kind == "random":
        return np.random.default_rng(seed).random((len(rows), H)).astype(np.float32)
    if kind == "popularity":
        train = np.isin(rd.cand_request, np.concatenate([rd.requests_in("train"), rd.requests_in("feature")]))
        n_items = len(rd.pf_item_vectors)
        counts = np.stack([np.bincount(rd.cand_item[train], weights=rd.labels[train, h], minlength=n_items)
                           for h in range(H)], 1)
        return counts[rd.cand_item[rows]].astype(np.float32)
    if kind == "pinnerformer":
        owner = rd.cand_request[rows]
        s = (np.asarray(rd.user_vectors[owner]) * rd.pf_item_vectors[rd.cand_item[rows]]).sum(1) * pf_visible(rd, owner)
        return _per_head(s, rd.heads)
    if kind in ("item-rate", "item-value"):
        table = rank_features(rd, FeatureConfig(families=["item_counts", "numeric_value"]))
        if kind == "item-rate":
            return np.stack([table.values[rows, table.names.index(f"item.rate.{h.name}")] for h in rd.heads], 1)
        if "value.item_mean" not in table.names:
            return None  # no numbers in this data: no such baseline
        return _per_head(table.values[rows, table.names.index("value.item_mean")], rd.heads)
    raise ValueError(f"unknown baseline {kind!r} (expected one of: {', '.join(BASELINES)})")


def _per_head(goodness: np.ndarray, heads: list[Head]) -> np.ndarray:
    """One goodness score as every head's score: as it is for positive heads, negated for negative ones (a hide is
    predicted by a low goodness, so its AUC is not read upside down)."""
    return np.stack([-goodness if h.negative else goodness for h in heads], 1).astype(np.float32)


def utility(scores: np.ndarray, heads: list[Head]) -> np.ndarray:
    """What the ranker would serve by: the positive heads' scores minus the negative heads'."""
    sign = np.array([-1.0 if h.negative else 1.0 for h in heads])
    return scores @ sign


class MetricValue(StrictModel):
    mean: float
    ci95: list[float]


class Lift(StrictModel):
    lift: float  # relative: model / reference - 1
    ci95: list[float]  # paired bootstrap over requests


class PerRequest:
    """Per-request values of every metric of one scored model (what means, intervals and paired lifts are made
    of), for the requests of one split."""

    def __init__(self, scores: np.ndarray, rd: RankData, requests: np.ndarray, k: int = 3, seed: int = 0,
                 interests: list[list[str]] | None = None):
        rows, self.starts = rd.candidate_rows(requests)
        self.labels, self.scores, self.heads, self.k = rd.labels[rows], scores, rd.heads, k
        served = utility(scores, rd.heads)
        self.values: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # key -> (per request, weights)
        for h, head in enumerate(rd.heads):
            order_by = served if head.negative else scores[:, h]
            self.values[rm.metric_key(rm.HIT, head.name, k)] = (
                rm.hit_at_k(order_by, self.labels[:, h], self.starts, k, head.negative, seed), None)
            self.values[rm.metric_key(rm.GAUC, head.name)] = rm.request_aucs(scores[:, h], self.labels[:, h],
                                                                               self.starts)
        if interests is not None:
            self.values[f"{rm.TOP_DIVERSITY}"] = (
                rm.top_k_interests(served, rd.cand_item[rows], self.starts, interests, k), None)

    def global_auc(self, h: int, weights: np.ndarray | None = None) -> float:
        return rm.weighted_auc(self.scores[:, h], self.labels[:, h], weights)

    def means(self) -> dict[str, float]:
        out = {key: rm._weighted_mean(v, np.ones(len(v)) if w is None else w) for key, (v, w) in self.values.items()}
        for h, head in enumerate(self.heads):
            out[rm.metric_key(rm.AUC, head.name)] = self.global_auc(h)
        return out

    def with_intervals(self, draws: np.ndarray, auc_draws: np.ndarray) -> dict[str, MetricValue]:
        means = self.means()
        out = {key: MetricValue(mean=means[key], ci95=rm.per_request_ci(v, draws, w))
               for key, (v, w) in self.values.items()}
        for h, head in enumerate(self.heads):
            key = rm.metric_key(rm.AUC, head.name)
            out[key] = MetricValue(mean=means[key], ci95=rm.auc_ci(self.scores[:, h], self.labels[:, h], self.starts,
                                                                   auc_draws))
        return out

    def lifts(self, reference: "PerRequest", draws: np.ndarray) -> dict[str, Lift]:
        out = {}
        for key, (v, w) in self.values.items():
            if key.startswith(rm.HIT) or key.startswith(rm.GAUC):
                point, ci = rm.paired_lift(v, reference.values[key][0], draws, w)
                out[key] = Lift(lift=point, ci95=ci)
        return out
