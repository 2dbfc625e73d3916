"""Ranking metrics over a full catalogue, and their names (defined here only). Ties are counted pessimistically: an
item tied with the label ranks above it. By default history is not excluded (an item the user already had may be
recommended again); the scorer can remove it from the ranking (`evaluation.scorer`).

A user with several labels has each label ranked against the catalogue *minus the user's other labels*: in
the PinnerFormer protocol every label competes with an index of random items, not with the user's other
positives (with a 1M-item random index those are almost never in it). Otherwise a user with 50 labels could
score at most 10/50 however good the model is.
"""

from __future__ import annotations

import numpy as np
import torch

# Metric names; a reported metric is NAME@k (e.g. "recall@10", "interest-entropy@50").
RECALL, HIT_RATE, NDCG = "recall", "hr", "ndcg"  # per user (window), from the labels' ranks
INTEREST_ENTROPY = "interest-entropy"  # per user, from the top-50 items' interests
P90_COVERAGE = "p90-coverage"  # over all users' top-k items
ENTROPY_TOP = 50


def metric_name(metric: str, k: int) -> str:
    return f"{metric}@{k}"



def label_ranks(scores: torch.Tensor, labels: list[np.ndarray]) -> list[np.ndarray]:
    """0-based rank of each label: the number of non-label items scoring >= it (ties pessimistic)."""
    out = []
    for row, lab in zip(scores, labels):
        if len(lab) == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        idx = torch.as_tensor(lab, device=row.device)
        s = row[idx]
        ge = (row.unsqueeze(0) >= s.unsqueeze(1)).sum(1)  # every item >= the label, itself included
        ge -= (s.unsqueeze(0) >= s.unsqueeze(1)).sum(1)  # minus the labels (itself and the user's others)
        out.append(ge.cpu().numpy())
    return out


def recall_at_k(ranks: list[np.ndarray], k: int) -> np.ndarray:
    """Per user: the share of their labels ranked in the top k (users without labels: NaN)."""
    return np.array([(r < k).mean() if len(r) else np.nan for r in ranks])


def hit_rate_at_k(ranks: list[np.ndarray], k: int) -> np.ndarray:
    return np.array([float((r < k).any()) if len(r) else np.nan for r in ranks])


def ndcg_at_k(ranks: list[np.ndarray], k: int) -> np.ndarray:
    """Single-target NDCG: 1/log2(rank + 2) when the target is in the top k (the ideal DCG is 1)."""
    return np.array([float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).max()) if len(r) else np.nan for r in ranks])


def interest_entropy(top_items: np.ndarray, item_interests: list[list[str]]) -> np.ndarray:
    """Per user: entropy (nats) of the interest distribution over their top-k items.

    An item with several interests spreads a weight of 1 evenly over them; items with no interests add
    nothing. Users whose top-k has no interest at all get NaN.
    """
    out = np.full(len(top_items), np.nan)
    for u, row in enumerate(top_items):
        w: dict[str, float] = {}
        for it in row:
            ints = item_interests[int(it)]
            for name in ints:
                w[name] = w.get(name, 0.0) + 1.0 / len(ints)
        if w:
            p = np.array(list(w.values()))
            p = p / p.sum()
            out[u] = float(-(p * np.log(p)).sum())
    return out


def p90_coverage(top_items: np.ndarray, index_size: int) -> float:
    """Smallest share of the index that fills 90% of all top-k slots over all users (near 0: collapse)."""
    counts = np.sort(np.bincount(top_items.reshape(-1), minlength=index_size))[::-1]
    need = 0.9 * top_items.size
    n = int(np.searchsorted(np.cumsum(counts), need - 1e-9) + 1)
    return n / index_size


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users (NaN users are dropped first)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


PER_USER = {RECALL: recall_at_k, HIT_RATE: hit_rate_at_k, NDCG: ndcg_at_k}  # metric -> f(ranks, k)
