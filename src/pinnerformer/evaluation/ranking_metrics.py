"""Ranking metrics over requests (the candidates shown together), and their names, defined here only.

Candidates of all requests lie in flat arrays; request r owns positions starts[r] : starts[r + 1].

HIT@k of head h (the TransAct papers' metric; Xia et al., KDD 2023, arXiv:2306.00248): in each request with at least one candidate engaged with
h, the candidates are shuffled (fixed seed) and ordered by a score; the number of h-engaged candidates in the top
k, averaged over those requests. A positive head (save, click) ranks by its own score: higher is better. A negative
head (hide) is read on the order the ranker would serve, the utility (the positive heads' probabilities minus the
negative heads'): how many hidden items reach the top k, lower is better. Ties are pessimistic: among equal scores
an engaged candidate of a positive head comes last, one of a negative head first (so a constant score earns
nothing).

AUC: the Mann-Whitney statistic over all candidates (ties count one half). Grouped AUC: the AUC inside each request
that has both an engaged and a non-engaged candidate, averaged with the request's candidate count as its weight
(as in DIN, Zhou et al. 2018). Intervals: percentile bootstrap over requests (1,000 draws; 200 for the global AUC);
a lift's interval resamples the same requests for both models (paired).
"""

from __future__ import annotations

import numpy as np

HIT, AUC, GAUC, TOP_DIVERSITY = "hit", "auc", "gauc", "top3-interests"


def metric_key(metric: str, head: str, k: int = 3) -> str:
    """'hit@3/save', 'auc/save', 'gauc/save'."""
    return f"{metric}@{k}/{head}" if metric == HIT else f"{metric}/{head}"


def hit_at_k(scores: np.ndarray, labels: np.ndarray, starts: np.ndarray, k: int = 3, negative: bool = False,
             seed: int = 0) -> np.ndarray:
    """Per request: engaged candidates in the top k (NaN for requests with none engaged)."""
    out = np.full(len(starts) - 1, np.nan)
    rng = np.random.default_rng(seed)
    for r in range(len(starts) - 1):
        a, b = int(starts[r]), int(starts[r + 1])
        y = labels[a:b] > 0
        if not y.any():
            continue
        shuffle = rng.permutation(b - a)
        # lexsort: the last key is the primary one: score (descending), then the pessimistic tie-break, then shuffle
        order = np.lexsort((shuffle, ~y if negative else y, -scores[a:b]))
        out[r] = float(y[order[:k]].sum())
    return out


def _tie_groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Group id of each position of an ascending array (equal scores share a group)."""
    return np.concatenate([[0], np.cumsum(sorted_scores[1:] != sorted_scores[:-1])]) if len(sorted_scores) else \
        np.zeros(0, np.int64)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """P(score of an engaged candidate > score of a non-engaged one), ties one half; candidates weighted (the
    bootstrap draws requests by weighting their candidates). NaN without both classes."""
    y = labels > 0
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], y[order], w[order]
    g = _tie_groups(s)
    wn = np.bincount(g, weights=w * ~y)  # non-engaged weight per tie group
    wp = np.bincount(g, weights=w * y)
    below = np.cumsum(wn) - wn  # non-engaged weight strictly below each group
    total_p, total_n = wp.sum(), wn.sum()
    if total_p == 0 or total_n == 0:
        return float("nan")
    return float((wp * (below + 0.5 * wn)).sum() / (total_p * total_n))


def request_aucs(scores: np.ndarray, labels: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request: its AUC (NaN without both classes) and its weight (candidate count)."""
    n = len(starts) - 1
    auc = np.full(n, np.nan)
    for r in range(n):
        a, b = int(starts[r]), int(starts[r + 1])
        y = labels[a:b] > 0
        if y.any() and not y.all():
            auc[r] = weighted_auc(scores[a:b], labels[a:b])
    return auc, np.diff(starts).astype(np.float64)


def grouped_auc(scores: np.ndarray, labels: np.ndarray, starts: np.ndarray) -> float:
    auc, w = request_aucs(scores, labels, starts)
    ok = ~np.isnan(auc)
    return float((auc[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> float:
    ok = ~np.isnan(values)
    return float((values[ok] * w[ok]).sum() / w[ok].sum()) if (w[ok] > 0).any() else float("nan")


def bootstrap_draws(n_requests: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_requests] how many times each request is drawn (the same draws for every model: paired); int32,
    4 bytes per request and draw (1,000 draws of 100k requests: 400 MB)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_requests, n_requests), minlength=n_requests).astype(np.int32)
                     for _ in range(n_boot)])


def interval(samples: np.ndarray) -> list[float]:
    s = np.asarray(samples)[~np.isnan(samples)]
    return [float(np.quantile(s, 0.025)), float(np.quantile(s, 0.975))] if len(s) else [float("nan")] * 2


def per_request_ci(values: np.ndarray, draws: np.ndarray, weights: np.ndarray | None = None) -> list[float]:
    """95% interval of the (weighted) mean of per-request values over the bootstrap draws."""
    w = np.ones(len(values)) if weights is None else weights
    return interval(np.array([_weighted_mean(values, d * w) for d in draws]))


def auc_ci(scores: np.ndarray, labels: np.ndarray, starts: np.ndarray, draws: np.ndarray) -> list[float]:
    owner = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    return interval(np.array([weighted_auc(scores, labels, d[owner]) for d in draws]))


def paired_lift(values: np.ndarray, base: np.ndarray, draws: np.ndarray, weights: np.ndarray | None = None
                ) -> tuple[float, list[float]]:
    """Relative lift of a per-request metric over a baseline's on the same requests, mean(v)/mean(base) - 1, and
    its paired 95% interval (each draw resamples the same requests for both)."""
    w = np.ones(len(values)) if weights is None else weights
    point = _weighted_mean(values, w) / _weighted_mean(base, w) - 1
    lifts = np.array([_weighted_mean(values, d * w) / _weighted_mean(base, d * w) - 1 for d in draws])
    return float(point), interval(lifts)


def top_k_interests(scores: np.ndarray, items: np.ndarray, starts: np.ndarray, interests: list[list[str]],
                    k: int = 3) -> np.ndarray:
    """Per request: distinct interests (genres, categories) among its top-k candidates by score (NaN when no
    candidate of the top k has any): the diversity of what is served."""
    out = np.full(len(starts) - 1, np.nan)
    for r in range(len(starts) - 1):
        a, b = int(starts[r]), int(starts[r + 1])
        top = items[a:b][np.argsort(-scores[a:b], kind="stable")[:k]]
        found = {x for it in top for x in interests[int(it)]}
        if found:
            out[r] = float(len(found))
    return out
