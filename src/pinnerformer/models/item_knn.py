"""Item-to-item neighbours for the next item: a non-parametric scorer fit on the training timelines, to blend with
the network (evaluation/blend.py) or to stand alone as a baseline.

Fit: for every pair of one user's positive actions, item a before item b with d - 1 actions between them (d ≤
`window`), the directed co-occurrence C[a, b] gains gap_decay^(d - 1), and C[b, a] `backward` times as much (an
item bought after another says less about the reverse order, but not nothing). Normalised by how many users had
each item, asymmetrically (Aiolli's asymmetric cosine):

    sim(a → b) = C[a, b] / (n_a^α · n_b^(1 - α))

α > 0.5 damps popular sources more than popular candidates. Each item keeps its `neighbours` most similar items.
A user's score for item b sums over their newest `last` positive items h_0 (newest), h_1, …:

    score(b) = Σ_k recency^k · sim(h_k → b)

The defaults were chosen on Amazon Beauty's validation split (leave-one-out, history removed; docs/results/).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from pinnerformer.config import StrictModel
from pinnerformer.data.timelines import Timelines, TimelineView


class ItemKNNConfig(StrictModel):
    window: int = Field(50, ge=1)  # pairs at most this many actions apart count
    gap_decay: float = Field(0.8, gt=0, le=1)  # a pair d actions apart weighs gap_decay^(d - 1)
    backward: float = Field(0.3, ge=0)  # weight of the reverse direction (b → a for a before b)
    alpha: float = Field(0.8, ge=0, le=1)  # asymmetric cosine: n_source^α · n_candidate^(1 - α)
    neighbours: int = Field(500, ge=1)  # kept per source item (the largest similarities)
    last: int = Field(20, ge=1)  # newest positive items of the user that vote
    recency: float = Field(0.6, gt=0, le=1)  # the k-th newest votes recency^k


def positive_events(view: TimelineView, positive_codes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of every positive action inside the view, in timeline order (so in time order per user)."""
    tl = view.base
    lengths = view.lengths
    idx = np.repeat(view.start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    user = np.repeat(np.arange(len(lengths)), lengths)
    keep = np.isin(np.asarray(tl.action)[idx], np.asarray(positive_codes))
    return user[keep], np.asarray(tl.item)[idx[keep]].astype(np.int64)


class ItemKNN:
    def __init__(self, similarity: sp.csr_matrix, cfg: ItemKNNConfig, positive_codes: list[int]):
        self.similarity = similarity  # [n_items, n_items] sim(source → candidate)
        self.cfg = cfg
        self.positive_codes = list(positive_codes)

    @classmethod
    def fit(cls, view: TimelineView, n_items: int, positive_codes: list[int], cfg: ItemKNNConfig = ItemKNNConfig()
            ) -> "ItemKNN":
        user, item = positive_events(view, positive_codes)
        co = sp.csr_matrix((n_items, n_items), dtype=np.float64)
        for d in range(1, cfg.window + 1):
            same = user[d:] == user[:-d]  # pairs d actions apart within one user
            if not same.any():
                break
            a, b = item[:-d][same], item[d:][same]
            w = np.full(len(a), cfg.gap_decay ** (d - 1))
            rows, cols, vals = (np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([w, w * cfg.backward])
                                ) if cfg.backward else (a, b, w)
            co = co + sp.csr_matrix((vals, (rows, cols)), shape=(n_items, n_items))  # duplicates are summed
        co.setdiag(0)
        co.eliminate_zeros()
        # users per item (an item twice in one history counts once)
        pairs = np.unique(user * n_items + item)
        n = np.bincount(pairs % n_items, minlength=n_items).astype(np.float64)
        n[n == 0] = 1.0
        sim = (sp.diags(n ** -cfg.alpha) @ co @ sp.diags(n ** -(1.0 - cfg.alpha))).tocsr()
        return cls(_top_per_row(sim, cfg.neighbours), cfg, positive_codes)

    def scores(self, timelines: Timelines, starts: np.ndarray, ends: np.ndarray) -> torch.Tensor:
        """[rows, n_items] float32: each row's score from its positive actions in [start, end) (newest `last`)."""
        view = TimelineView(timelines, np.asarray(starts, np.int64), np.asarray(ends, np.int64))
        user, item = positive_events(view, self.positive_codes)
        # rank from the newest: 0 for each row's last positive, 1 for the one before, …
        counts = np.bincount(user, minlength=len(starts))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        age = (first + counts)[user] - 1 - np.arange(len(user))
        keep = age < self.cfg.last
        votes = sp.csr_matrix((self.cfg.recency ** age[keep], (user[keep], item[keep])),
                              shape=(len(starts), self.similarity.shape[0]))  # duplicates are summed
        return torch.from_numpy(np.asarray((votes @ self.similarity).todense(), dtype=np.float32))


def _top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row's k largest entries (ties: the lower item index first)."""
    m = m.tocsr()
    m.sort_indices()
    lengths = np.diff(m.indptr)
    if lengths.max(initial=0) <= k:
        return m
    rows = np.repeat(np.arange(m.shape[0]), lengths)
    # within each row, order by value descending (lexsort's last key is the primary one)
    order = np.lexsort((m.indices, -m.data, rows))
    rank = np.arange(len(order)) - np.repeat(m.indptr[:-1], lengths)
    keep = order[rank < k]
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)
