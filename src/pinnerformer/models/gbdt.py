"""Gradient-boosted trees on the point-in-time features (LightGBM; Ke et al., "LightGBM: A Highly Efficient Gradient
Boosting Decision Tree", NeurIPS 2017): what a practitioner ranks with when they have counters and no sequence
model, and so the baseline every ranking report shows. One binary model per head on the same rows, features and
labels as the neural ranker; each candidate row's inputs are its point-in-time features, the PinnerFormer score
(the user's vector of the day before · the item's vector), whether the user had a vector, and the request's hour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.data.requests import RankData
from pinnerformer.features.point_in_time import FeatureConfig
from pinnerformer.features.rank_batch import pf_visible
from pinnerformer.features.rank_features import rank_features


class GbdtConfig(StrictModel):
    num_leaves: int = Field(31, ge=2)
    learning_rate: float = Field(0.05, gt=0)
    max_rounds: int = Field(2000, ge=1)
    early_stopping_rounds: int = Field(50, ge=1)  # on the validation period's log loss
    min_data_in_leaf: int = Field(50, ge=1)
    feature_fraction: float = Field(0.8, gt=0, le=1)
    bagging_fraction: float = Field(0.8, gt=0, le=1)
    lambda_l2: float = Field(1.0, ge=0)
    threads: int = Field(0, ge=0)  # 0: LightGBM's default (all cores)

    def params(self, seed: int) -> dict:
        return {"objective": "binary", "metric": "binary_logloss", "num_leaves": self.num_leaves,
                "learning_rate": self.learning_rate, "min_data_in_leaf": self.min_data_in_leaf,
                "feature_fraction": self.feature_fraction, "bagging_fraction": self.bagging_fraction,
                "bagging_freq": 1, "lambda_l2": self.lambda_l2, "seed": seed, "deterministic": True,
                "force_row_wise": True, "num_threads": self.threads, "verbose": -1}


def gbdt_inputs(rd: RankData, rows: np.ndarray, features: FeatureConfig) -> tuple[np.ndarray, list[str]]:
    """[rows, inputs] float32 and their names: the point-in-time features, then the PinnerFormer score, whether the
    user had a vector, the request's UTC hour."""
    table = rank_features(rd, features)
    owner = rd.cand_request[rows]
    visible = pf_visible(rd, owner)  # (not in the feature period: see pf_visible)
    pf = (np.asarray(rd.user_vectors[owner], np.float32) * rd.pf_item_vectors[rd.cand_item[rows]]).sum(1) * visible
    extra = np.stack([pf, visible.astype(np.float32), rd.hour[owner].astype(np.float32)], 1)
    return (np.concatenate([table.values[rows], extra], 1),
            table.names + ["pinnerformer.score", "pinnerformer.has_vector", "context.hour"])


class GbdtRanker:
    """One LightGBM booster per head; `predict` gives [rows, heads] probabilities like the neural ranker's."""

    FOLDER = "gbdt"

    def __init__(self, boosters: list, heads: list[str], features: FeatureConfig):
        self.boosters, self.heads, self.features = boosters, heads, features

    def score_rows(self, rd: RankData, rows: np.ndarray) -> np.ndarray:
        x, _ = gbdt_inputs(rd, rows, self.features)
        if not len(rows):
            return np.zeros((0, len(self.heads)), np.float32)
        return np.stack([b.predict(x, num_iteration=b.best_iteration or None) for b in self.boosters],
                        1).astype(np.float32)

    def score_requests(self, rd: RankData, requests: np.ndarray) -> np.ndarray:
        rows, _ = rd.candidate_rows(requests)
        return self.score_rows(rd, rows)

    def save(self, run_dir: Path) -> None:
        folder = Path(run_dir) / self.FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for head, b in zip(self.heads, self.boosters):
            b.save_model(str(folder / f"{head}.txt"), num_iteration=b.best_iteration or None)

    @staticmethod
    def load(run_dir: Path, heads: list[str], features: FeatureConfig) -> "GbdtRanker":
        import lightgbm as lgb

        folder = Path(run_dir) / GbdtRanker.FOLDER
        return GbdtRanker([lgb.Booster(model_file=str(folder / f"{h}.txt")) for h in heads], heads, features)
