"""The ranker's loss: weighted multi-label binary cross-entropy over heads (TransAct paper, Xia et al., KDD 2023, arXiv:2306.00248, §3.4).

    L = Σ_rows w_u · Σ_h w_h · BCE(logit_h, y_h)  /  Σ_rows w_u

Head weights depend on the row's other labels through a label-weight matrix M (heads × [impression, heads]):
    w_h = Σ_a M[h, a] · y_a,   with y_impression = 1 for every row (every row is a shown candidate).
The default M is the identity on the impression column and zero elsewhere: every head weight 1, the plain
multi-label BCE. The paper's example: a hidden item is a strong negative for the positive heads, so raise their
weight on hides, e.g. `{"save": {"hide": 2.0}}` makes w_save = 1 + 2·y_hide.
User weights w_u (optional): `inverse-sqrt` weighs each training row by 1/sqrt(the user's training rows), scaled
to mean 1, so that the heaviest users do not dominate the loss.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.errors import PinnerformerError
from pinnerformer.objectives.next_action import NextActionConfig


class MultiTaskLossConfig(StrictModel):
    # head -> {label (a head name, or "impression") -> weight}: entries of M beyond the default (M[h, impression]=1)
    label_weights: dict[str, dict[str, float]] = {}
    user_weight: Literal["none", "inverse-sqrt"] = "none"
    # per training request: its rows weigh 1 each (none), 1/sqrt(rows) or 1/rows (each request the same in all, as
    # HIT@k counts them); a log whose large requests are another population (ML-1M: newcomers rating 100 films on
    # their first day, against a dozen for a request of the later periods) otherwise trains on those
    request_weight: Literal["none", "inverse-sqrt", "inverse"] = "none"
    # > 0: add this times the listwise loss (objectives/request_softmax.py); batches then hold whole requests
    listwise: float = Field(0.0, ge=0)
    next_action: NextActionConfig = NextActionConfig()  # TransAct V2's auxiliary loss (other sequences: unused)


def label_weight_matrix(cfg: MultiTaskLossConfig, heads: list[str]) -> torch.Tensor:
    """M [H, 1 + H]: column 0 is the impression, then the heads in order."""
    cols = ["impression", *heads]
    m = torch.zeros(len(heads), len(cols))
    m[:, 0] = 1.0
    for h, row in cfg.label_weights.items():
        if h not in heads:
            raise PinnerformerError(f"loss.label_weights: unknown head '{h}' (the data's heads: {', '.join(heads)})")
        for a, w in row.items():
            if a not in cols:
                raise PinnerformerError(f"loss.label_weights.{h}: unknown label '{a}' (expected one of: "
                                        f"{', '.join(cols)})")
            m[heads.index(h), cols.index(a)] = w
    return m


def head_weights(labels: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[N, H] w_h = Σ_a M[h, a] · y_a, with the impression label 1 on every row."""
    y = torch.cat([torch.ones_like(labels[:, :1]), labels], 1)
    return y @ m.T


def multitask_bce(logits: torch.Tensor, labels: torch.Tensor, m: torch.Tensor, row_weight: torch.Tensor,
                  weight_total: torch.Tensor | None = None) -> torch.Tensor:
    """The row-weighted mean of the rows' weighted BCE; weight_total: the denominator when these rows are one
    rank's share of a distributed batch (the whole batch's Σ row_weight), so the shares add up to the batch's loss."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")  # [N, H]
    per_row = (head_weights(labels, m) * bce).sum(1)
    total = row_weight.sum() if weight_total is None else weight_total
    return (row_weight * per_row).sum() / total.clamp(min=1e-12)


def row_weights(cfg: MultiTaskLossConfig, row_user: np.ndarray, row_request: np.ndarray, n_users: int
                ) -> np.ndarray:
    """Per training row: the product of its user's and its request's weight, scaled to mean 1."""
    w = user_row_weights(cfg.user_weight, row_user, n_users).astype(np.float64)
    if cfg.request_weight != "none" and len(row_request):
        _, inverse, size = np.unique(row_request, return_inverse=True, return_counts=True)
        n = size[inverse].astype(np.float64)
        w = w / (np.sqrt(n) if cfg.request_weight == "inverse-sqrt" else n)
    return (w / w.mean()).astype(np.float32) if len(w) else w.astype(np.float32)


def user_row_weights(kind: str, row_user: np.ndarray, n_users: int) -> np.ndarray:
    """Per training row: 1, or 1/sqrt(the user's rows) scaled to mean 1."""
    if kind == "none" or len(row_user) == 0:
        return np.ones(len(row_user), np.float32)
    per_user = np.bincount(row_user, minlength=n_users).astype(np.float64)
    w = 1.0 / np.sqrt(per_user[row_user])
    return (w / w.mean()).astype(np.float32)
