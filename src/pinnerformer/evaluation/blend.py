"""The network blended with item-to-item neighbours (models/item_knn.py): a mixture of two next-item distributions,

    p(i | u) = (1 - λ) · softmax(s(u, ·) / τ)[i] + λ · knn(u, i) / Σ_j knn(u, j)

s(u, i) the network's score (cosine; an ensemble's mean cosine), τ its learned temperature (an ensemble's mean), so
that the first term is the distribution the sampled softmax trained; knn the neighbours' scores, normalised per
user (a user whose items have no neighbours keeps the network's ranking). Items are ranked by log p. λ is chosen
on the validation split, from a fixed grid, under the protocol the ranking is scored under (history removed or in;
runs/evaluate.py keeps one λ per protocol): the best validation NDCG, the smallest λ among ties. The two differ
where users come back to their own items: the neighbours rank those, the network (trained with them masked) does
not. Leave-one-out only: the neighbours are fit on the same training part as the network (every user's timeline but
the last two actions; for a refit, which trained on the validation targets too, but the last action, and λ is its
selection run's).
The blend is not an inner product: retrieval from a vector index serves the network alone.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from pinnerformer.config import StrictModel
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.metrics import NDCG, metric_name
from pinnerformer.evaluation.scorer import Scorer, score_task
from pinnerformer.evaluation.tasks import EvalTask, leave_one_out_task
from pinnerformer.models.embedding import embed_items, embed_users
from pinnerformer.models.item_knn import ItemKNN, ItemKNNConfig
from pinnerformer.models.pinnerformer import PinnerFormer
from pinnerformer.progress import progress_bar

NETWORK = "pinnerformer network alone"  # the network without the blend (a reference row in blended reports)
KNN = "item-kNN (neighbours alone)"


class BlendConfig(StrictModel):
    """The `blend` section of a training config."""

    item_knn: bool = False  # leave-one-out: rank by the network mixed with item-to-item neighbours
    # λ, chosen on validation; near 1 the neighbours rank first and the network orders what they leave unscored
    weights: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)] + [0.95, 0.99])
    knn: ItemKNNConfig = ItemKNNConfig()

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= w < 1.0 for w in v):
            raise ValueError("blend weights must be a non-empty list of numbers in [0, 1)")
        return sorted(set(v))


class BlendChoice(StrictModel):
    """λ as chosen on validation, with the curve it was chosen from (written to RUN/blend.json)."""

    weight: float
    metric: str  # e.g. ndcg@10
    history_excluded: bool
    weights: list[float] = []  # the grid λ was chosen from
    validation: dict[str, float]  # λ (as text) -> validation metric
    checkpoint: str  # which checkpoint (sha256 of its file) the choice belongs to
    knn: ItemKNNConfig
    fingerprint: str  # the dataset's
    # a refit's blend (eval.refit_epochs): the run it repeats, whose validation chose λ (carried over as the epoch
    # count is); the neighbours are then fit on the refit's training part, every timeline but its last action
    chosen_by: str | None = None


def blend_scores(logits: torch.Tensor, knn: torch.Tensor, weight: float) -> torch.Tensor:
    """log((1 - λ) softmax(logits) + λ knn / Σ knn), per row, in float64 (the low tail of a softmax over a large
    catalogue underflows float32; in float64 only a logit spread over ~745, out of reach of cosine scores, would
    turn the tail into ties at log 0)."""
    p = torch.softmax(logits.double(), dim=1)
    if weight == 0.0:
        return torch.log(p)
    k = knn.double()
    k = k / k.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.log((1.0 - weight) * p + weight * k)


class Blend:
    """The network's vectors and the neighbours for one task: scorers for the blend at any λ, and each part alone."""

    def __init__(self, model: PinnerFormer, ds: Dataset, task: EvalTask, knn: ItemKNN):
        dev = torch.device("cpu")
        self.users = embed_users(model, ds.timelines, task.starts, task.ends, dev)
        self.items = embed_items(model, dev)
        self.tau = float(model.temperature.detach())
        self.knn, self.task, self.timelines = knn, task, ds.timelines

    def knn_scores(self, rows: slice) -> torch.Tensor:
        return self.knn.scores(self.timelines, self.task.starts[rows], self.task.ends[rows])

    def scorer(self, name: str, weight: float) -> Scorer:
        return Scorer(name, None, None, rows_fn=lambda rows: blend_scores(
            self.users[rows] @ self.items.T / self.tau, self.knn_scores(rows), weight))

    def network(self) -> Scorer:
        return Scorer(NETWORK, self.users, self.items)

    def neighbours(self) -> Scorer:
        return Scorer(KNN, None, None, rows_fn=self.knn_scores)


def check_blend_applies(protocol: str, held_out) -> None:
    if protocol != "leave-one-out" or held_out is not None:
        raise PinnerformerError("the item-kNN blend (blend.item_knn) is defined for runs trained and scored under the "
                                "leave-one-out protocol only (its neighbours are fit on every user's timeline but the "
                                "last two actions, as such a run was trained)")


def fit_knn(ds: Dataset, cfg: ItemKNNConfig, refit: bool = False) -> ItemKNN:
    """The neighbours on leave-one-out's training part (every timeline but its last two actions; a refit's: but its
    last action, the validation targets too, as the refit network was trained)."""
    return ItemKNN.fit(ds.timelines.drop_last(1 if refit else 2), ds.manifest.n_items, ds.manifest.positive_codes, cfg)


def choose_weight(model: PinnerFormer, ds: Dataset, cfg: BlendConfig, exclude_history: bool, checkpoint: str,
                  k: int = 10, log=print, progress: bool = False) -> BlendChoice:
    """λ with the best validation NDCG@k (the smallest among ties); progress: a bar over the grid's rows."""
    task = leave_one_out_task(ds, "validation")
    blend = Blend(model, ds, task, fit_knn(ds, cfg.knn))
    history = ds.timelines if exclude_history else None
    name = metric_name(NDCG, k)
    curve = {}
    with progress_bar(total=len(task) * len(cfg.weights), desc=f"choosing λ among {len(cfg.weights)}", unit="row",
                      disable=not progress) as bar:
        for w in cfg.weights:
            res, _ = score_task(task, blend.scorer("blend", w), k, [NDCG], None, None, history, intervals=False,
                                advance=bar.update)
            curve[w] = res[name].mean
            log(f"blend λ {w:g}: validation {name} {curve[w]:.4f}")
    best = max(curve.values())
    weight = min(w for w, v in curve.items() if v == best)
    return BlendChoice(weight=weight, metric=name, history_excluded=exclude_history, weights=list(cfg.weights),
                       validation={f"{w:g}": round(v, 6) for w, v in curve.items()}, checkpoint=checkpoint,
                       knn=cfg.knn, fingerprint=ds.manifest.fingerprint)

