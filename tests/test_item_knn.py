"""The item-to-item neighbour scorer (models/item_knn.py): its similarity and scores against a by-hand computation,
positives only, the per-item neighbour cut, and a planted next-item structure it must recover."""

import numpy as np
import pytest
import torch

from pinnerformer.data.timelines import Timelines
from pinnerformer.models.item_knn import ItemKNN, ItemKNNConfig, _top_per_row


def timelines(seqs: list[list[int]], actions: list[list[int]] | None = None) -> Timelines:
    item = np.concatenate([np.asarray(s, np.int32) for s in seqs])
    n = len(item)
    action = np.zeros(n, np.int16) if actions is None else np.concatenate([np.asarray(a, np.int16) for a in actions])
    return Timelines(offsets=np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64), item=item,
                     action=action, ts=np.arange(n, dtype=np.int64), surface=np.full(n, -1, np.int16),
                     duration=np.full(n, np.nan, np.float32), clock="order")


def by_hand(seqs, n_items, cfg: ItemKNNConfig) -> np.ndarray:
    co = np.zeros((n_items, n_items))
    users = np.zeros(n_items)
    for s in seqs:
        for it in set(s):
            users[it] += 1
        for p in range(len(s)):
            for q in range(p + 1, min(len(s), p + cfg.window + 1)):
                w = cfg.gap_decay ** (q - p - 1)
                co[s[p], s[q]] += w
                co[s[q], s[p]] += cfg.backward * w
    np.fill_diagonal(co, 0)
    users[users == 0] = 1
    return co / (users[:, None] ** cfg.alpha * users[None, :] ** (1 - cfg.alpha))


def test_similarity_and_scores_equal_a_by_hand_computation():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 12, rng.integers(1, 9))) for _ in range(30)]  # repeats and self-pairs included
    cfg = ItemKNNConfig(window=3, gap_decay=0.5, backward=0.25, alpha=0.7, neighbours=1000, last=4, recency=0.8)
    tl = timelines(seqs)
    knn = ItemKNN.fit(tl.full(), 12, [0], cfg)
    want = by_hand(seqs, 12, cfg)
    np.testing.assert_allclose(knn.similarity.toarray(), want, rtol=1e-12, atol=1e-15)
    # scores from each user's first two actions: Σ_k recency^k sim(h_k → ·), h_0 the newest
    starts, ends = tl.offsets[:-1], np.minimum(tl.offsets[:-1] + 2, tl.offsets[1:])
    got = knn.scores(tl, starts, ends).numpy()
    for u, s in enumerate(seqs):
        h = s[:2][::-1]
        expect = sum(cfg.recency ** k * want[it] for k, it in enumerate(h[:cfg.last]))
        np.testing.assert_allclose(got[u], expect, rtol=1e-5, atol=1e-7)


def test_only_the_newest_items_vote_and_only_positives_count():
    seqs = [[0, 1, 2, 3, 4, 5]]
    tl = timelines(seqs, actions=[[0, 0, 1, 0, 0, 0]])  # item 2 is not a positive action (code 1)
    cfg = ItemKNNConfig(window=1, backward=0.0, alpha=0.0, neighbours=10, last=2, recency=0.5)
    knn = ItemKNN.fit(tl.full(), 6, [0], cfg)
    sim = knn.similarity.toarray()
    # positives in order 0, 1, 3, 4, 5: item 2 takes part in no pair, 1 → 3 is adjacent among the positives
    assert sim[1, 2] == 0 and sim[2].sum() == 0 and sim[1, 3] == 1 and sim[3, 4] == 1 and sim[0, 1] == 1
    # the history 0, 1, 2, 3: positives 0, 1, 3, the newest two vote: 3 (weight 1) and 1 (weight 0.5)
    s = knn.scores(tl, np.array([0]), np.array([4])).numpy()[0]
    np.testing.assert_allclose(s, 1.0 * sim[3] + 0.5 * sim[1])


def test_top_per_row_keeps_each_rows_largest_entries():
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    dense = rng.random((20, 30)) * (rng.random((20, 30)) < 0.5)
    dense[3, [4, 7, 9]] = 0.5  # ties: the lower item index wins
    kept = _top_per_row(sp.csr_matrix(dense), 5).toarray()
    for r in range(20):
        nz = np.flatnonzero(dense[r])
        order = sorted(nz, key=lambda c: (-dense[r, c], c))[:5]
        assert set(np.flatnonzero(kept[r])) == set(order)
        np.testing.assert_array_equal(kept[r, order], dense[r, order])


def test_recovers_a_planted_next_item_structure():
    # 40 item chains a → a+1 → a+2 in blocks of 5, users walk random segments of one block with noise items
    rng = np.random.default_rng(0)
    n_items, seqs = 200, []
    for _ in range(600):
        block = rng.integers(0, 40) * 5
        start = rng.integers(0, 3)
        walk = [block + start + i for i in range(3)]
        noise = list(rng.integers(0, n_items, 2))
        seqs.append(noise + walk)
    tl = timelines(seqs)
    # fit on the first 500 users' whole timelines; the last 100 are scored from all but their last item
    fit_view = tl.full()
    held = np.arange(500, 600)
    fit_view.end[held] = fit_view.start[held]
    knn = ItemKNN.fit(fit_view, n_items, [0], ItemKNNConfig())
    s = knn.scores(tl, tl.offsets[:-1][held], tl.offsets[1:][held] - 1)
    target = torch.tensor([seqs[u][-1] for u in held])
    # the chain's next item is the top item for nearly every held-out user; popularity alone would be ~1/200
    assert (s.argmax(1) == target).float().mean() > 0.9


def test_config_is_checked():
    with pytest.raises(Exception, match="gap_decay"):
        ItemKNNConfig(gap_decay=0.0)
