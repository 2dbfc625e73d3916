"""Who is trained on and who is evaluated, and which metric selects the model.

future-window (real clocks): users are split deterministically by a hash of (seed, user id) into train /
validation / test. Training uses train users only; evaluation users are embedded from their actions before a
cut-off and labelled with their positives in the days after it (`evaluation.tasks`). Selection: recall@k.

leave-one-out (order-only clocks, or by choice): every user trains on all but the last two actions; the
second-to-last is the validation target and the last the test target. Selection: ndcg@k on validation only.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.timelines import TimelineView
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.metrics import HIT_RATE, NDCG, RECALL

Protocol = Literal["future-window", "leave-one-out"]
SPLITS = ["train", "validation", "test"]  # codes 0, 1, 2 of `user_split`
# metrics reported per protocol (besides coverage and, where items have interests, entropy), the first selects
REPORTED = {"future-window": [RECALL], "leave-one-out": [HIT_RATE, NDCG]}
SELECTION = {"future-window": RECALL, "leave-one-out": NDCG}


def resolve_protocol(setting: str, clock: str) -> Protocol:
    """"auto" -> leave-one-out for order-only data, future-window otherwise; future-window needs a real clock."""
    protocol = ("leave-one-out" if clock == "order" else "future-window") if setting == "auto" else setting
    if protocol == "future-window" and clock == "order":
        raise PinnerformerError("this dataset is order-only: the future-window protocol needs real timestamps "
                                "(use --protocol leave-one-out)")
    return protocol


def user_split(user_ids: list, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = validation, 2 = test, by a stable hash of (seed, user id): same on every machine."""
    out = np.zeros(len(user_ids), dtype=np.int8)
    for i, uid in enumerate(user_ids):
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big") / 2.0 ** 64
        out[i] = 1 if h < val_fraction else (2 if h < val_fraction + test_fraction else 0)
    return out


def training_view(ds: Dataset, protocol: str, split: np.ndarray | None, refit: bool = False) -> TimelineView:
    """The events training may see: train users' timelines (future-window) or all but the last two (LOO); refit
    (LOO, after selection): all but the last, the validation target trained on too."""
    tl = ds.timelines
    if protocol == "leave-one-out":
        return tl.drop_last(1 if refit else 2)
    full = tl.full()
    end = np.where(split == 0, full.end, full.start)  # held-out users contribute nothing
    return TimelineView(tl, full.start, end)


def positive_item_counts(ds: Dataset, view: TimelineView) -> np.ndarray:
    """How often each item was a positive action inside the view's ranges: the most-popular baseline's scores."""
    tl = view.base
    edges = np.zeros(tl.n_events + 1, dtype=np.int64)  # +1 where a range starts, -1 where it ends
    np.add.at(edges, view.start, 1)
    np.add.at(edges, view.end, -1)
    inside = np.cumsum(edges[:-1]) > 0
    positive = np.isin(np.asarray(tl.action), np.array(ds.manifest.positive_codes))
    return np.bincount(np.asarray(tl.item)[inside & positive], minlength=ds.manifest.n_items).astype(np.float64)
