"""Dataset summary: what `pinnerformer data stats` prints and tests assert."""

from __future__ import annotations

import numpy as np

from pinnerformer.data.dataset import Dataset


def dataset_stats(ds: Dataset) -> dict:
    m = ds.manifest
    tl = ds.timelines
    lengths = tl.lengths
    pct = {f"p{p}": float(np.percentile(lengths, p)) for p in (5, 25, 50, 75, 90, 99)}
    positives = int(ds.positive_mask[np.asarray(tl.action)].sum())
    return {
        "format": m.format,
        "users": m.n_users,
        "items": m.n_items,
        "events": m.n_events,
        "events_per_action": m.events_per_action,
        "positive_actions": [a.name for a in m.actions if a.positive],
        "positives_share": positives / m.n_events,
        "clock": m.clock,
        "time_range": m.time_range_text(),
        "time_min": m.time_min,
        "time_max": m.time_max,
        "events_per_user": {"min": int(lengths.min()), **pct, "max": int(lengths.max()), "mean": float(lengths.mean())},
        "items_with_text": int(ds.items["text"].is_not_null().sum()),
        "content_vectors": None if m.content_vectors is None else f"{m.content_vectors.dim}-d ({m.content_vectors.model})",
        "duplicates_removed": m.duplicates_removed,
        "skipped": m.skipped,
        "notes": m.notes,
        "fingerprint": m.fingerprint,
    }
