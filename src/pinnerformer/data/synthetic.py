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
