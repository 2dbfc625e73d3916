"""Generated event logs with planted structure, for tests and benchmarks.

Items fall into `n_groups` equal interest groups. Each user holds one group for the first part of their
timeline and then switches to another, which they keep; on-interest actions are positive `click`s, a small
share of off-interest actions are non-positive `skip`s. A model that reads the sequence should predict the
*current* group's items; popularity, by construction nearly flat across groups, cannot.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def planted_interest_log(n_users: int = 300, n_items: int = 200, n_groups: int = 10, events_per_user: int = 40,
                         switch_at: float = 0.4, noise: float = 0.1, seed: int = 0,
                         start: int = 1_600_000_000, gap_s: int = 3600,
                         start_spread_s: int = 30 * 86400) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    group_of_item = np.arange(n_items) % n_groups
    items_by_group = [np.flatnonzero(group_of_item == g) for g in range(n_groups)]
    rows_u, rows_i, rows_a, rows_t = [], [], [], []
    for u in range(n_users):
        g1, g2 = rng.choice(n_groups, 2, replace=False)
        t0 = start + int(rng.integers(0, start_spread_s))
        for k in range(events_per_user):
            g = g1 if k < switch_at * events_per_user else g2
            if rng.random() < noise:
                item, action = int(rng.integers(n_items)), "skip"
            else:
                item, action = int(rng.choice(items_by_group[g])), "click"
            rows_u.append(u)
            rows_i.append(item)
            rows_a.append(action)
            rows_t.append(t0 + k * gap_s + int(rng.integers(0, gap_s // 2)))
    return pl.DataFrame({"user": rows_u, "item": rows_i, "action": rows_a, "timestamp": rows_t})


def planted_request_log(n_users: int = 200, n_items: int = 200, n_groups: int = 10, days: int = 12,
                        browse: int = 6, engaged: int = 3, shown: int = 8, seed: int = 0,
                        start: int = 1_600_041_600) -> pl.DataFrame:
    """Ranking requests whose engaged candidates resemble the user's most recent actions, and nothing else.

    Every day each user picks a new interest group (so yesterday's long-term state says nothing about it): at
    08:00 they `click` `browse` items of the group; at 10:00 (a new session) they are shown `shown` candidates, of
    which `engaged` come from the day's group and are `save`d and the others (other groups) only `view`ed. Only a
    model that reads the realtime sequence can tell which candidates will be saved; `start` is a UTC midnight."""
    rng = np.random.default_rng(seed)
    group_of_item = np.arange(n_items) % n_groups
    items_by_group = [np.flatnonzero(group_of_item == g) for g in range(n_groups)]
    rows: list[tuple[int, int, str, int]] = []
    for u in range(n_users):
        for d in range(days):
            g = int(rng.integers(n_groups))
            t = start + d * 86400 + 8 * 3600
            for k, item in enumerate(rng.choice(items_by_group[g], browse, replace=False)):
                rows.append((u, int(item), "click", t + 60 * k))
            others = np.flatnonzero(group_of_item != g)
            cands = [(int(i), "save") for i in rng.choice(items_by_group[g], engaged, replace=False)]
            cands += [(int(i), "view") for i in rng.choice(others, shown - engaged, replace=False)]
            for k, j in enumerate(rng.permutation(len(cands))):
                rows.append((u, cands[j][0], cands[j][1], t + 2 * 3600 + 30 * k))
    return pl.DataFrame(rows, schema=["user", "item", "action", "timestamp"], orient="row")


def planted_lifelong_log(n_users: int = 120, n_items: int = 200, n_groups: int = 10, days: int = 10,
                         first: int = 5, noise: int = 20, engaged: int = 3, shown: int = 8, seed: int = 0,
                         start: int = 1_600_041_600) -> pl.DataFrame:
    """Requests whose engaged candidates resemble only an old action: each user `save`s `first` items of a secret
    group on day 0; every later day they `click` `noise` random items at 08:00 (filling any short realtime window)
    and at 10:00 are shown `shown` candidates, the `engaged` of the secret group `save`d, the others `view`ed. The
    realtime window of the last `noise` actions sees no trace of the group; the lifelong sequence does."""
    rng = np.random.default_rng(seed)
    group_of_item = np.arange(n_items) % n_groups
    rows: list[tuple[int, int, str, int]] = []
    for u in range(n_users):
        g = int(rng.integers(n_groups))
        mine, others = np.flatnonzero(group_of_item == g), np.flatnonzero(group_of_item != g)
        for k, item in enumerate(rng.choice(mine, first, replace=False)):
            rows.append((u, int(item), "save", start + 8 * 3600 + 60 * k))
        for d in range(1, days):
            t = start + d * 86400 + 8 * 3600
            for k, item in enumerate(rng.choice(n_items, noise, replace=False)):
                rows.append((u, int(item), "click", t + 60 * k))
            cands = [(int(i), "save") for i in rng.choice(mine, engaged, replace=False)]
            cands += [(int(i), "view") for i in rng.choice(others, shown - engaged, replace=False)]
            for k, j in enumerate(rng.permutation(len(cands))):
                rows.append((u, cands[j][0], cands[j][1], t + 2 * 3600 + 30 * k))
    return pl.DataFrame(rows, schema=["user", "item", "action", "timestamp"], orient="row")
