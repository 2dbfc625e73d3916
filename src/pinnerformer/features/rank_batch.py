"""Ranking data -> model inputs: a set of requests (their realtime sequences, user vectors, context) and the
candidate rows that point into them.

The realtime sequence of a request is the user's `seq_len` most recent actions strictly before it (the request's
`seq_end` index into the dataset's timelines), newest first, padded with action 0; a candidate row carries the index
of its request in the batch (`row_request`), so a request's sequence is built once however many candidates share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pinnerformer.data.requests import SPLIT_NAMES, RankData
from pinnerformer.data.timelines import Timelines
from pinnerformer.features.v2_streams import StreamSpec


@dataclass
class RankBatch:
    seq_action: torch.Tensor  # [R, L] int64: action code + 1 (0 = padding), newest first
    seq_item: torch.Tensor  # [R, L] int64 item index (0 at padding: masked by seq_action)
    seq_age: torch.Tensor  # [R, L] float32 seconds before the request (> 0)
    user_vec: torch.Tensor  # [R, D] float32 PinnerFormer vector of the day before (0 when none)
    has_vector: torch.Tensor  # [R] bool
    hour: torch.Tensor  # [R] int64 UTC hour of the request
    surface: torch.Tensor  # [R] int64 surface code + 1 (0 = not recorded)
    row_request: torch.Tensor  # [N] int64 index of each candidate's request in this batch
    cand_item: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N, H] float32 0/1 per head
    weight: torch.Tensor  # [N] float32 per-row (user) weight
    # TransAct V2 only: per request the lifelong / realtime / impressions streams ("lifelong.item", ...)
    streams: dict[str, torch.Tensor] | None = None
    # one rank's share of a distributed batch: the whole batch's Σ weight (the loss's denominator)
    weight_total: torch.Tensor | None = None
    features: torch.Tensor | None = None  # [N, F] float32 point-in-time features of the candidate rows
    user: torch.Tensor | None = None  # [R] int64 user code (-1: a user the ranking data does not know)

    def _map(self, fn) -> "RankBatch":
        out = {k: (fn(v) if v is not None else None) for k, v in self.__dict__.items() if k != "streams"}
        streams = None if self.streams is None else {k: fn(v) for k, v in self.streams.items()}
        return RankBatch(**out, streams=streams)

    def pin_memory(self) -> "RankBatch":
        return self._map(lambda v: v.pin_memory())

    def to(self, device: torch.device) -> "RankBatch":
        return self._map(lambda v: v.to(device, non_blocking=True))

    def staged(self, device: torch.device) -> "RankBatch":
        """On a GPU, through page-locked (pinned) host buffers, so the copies are asynchronous (serving: a request's
        streams of thousands of tokens); elsewhere as it is."""
        return (self.pin_memory() if device.type == "cuda" else self).to(device)

    @property
    def n_rows(self) -> int:
        return len(self.cand_item)


def pf_visible(rd: RankData, requests: np.ndarray) -> np.ndarray:
    """Per request: may its PinnerFormer vector be used? Not for requests of the feature period, whose vectors come
    from the model trained on that very period (it learned their engagements): those requests still train the ranker
    on everything else, as requests without a vector."""
    requests = np.asarray(requests, np.int64)
    return np.asarray(rd.has_vector[requests], bool) & (rd.split[requests] != SPLIT_NAMES.index("feature"))


def sequence_arrays(tl: Timelines, users: np.ndarray, seq_end: np.ndarray, t: np.ndarray, seq_len: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[R, L] action (+1, 0 = padding), item and age (s) of each request's last `seq_len` actions before seq_end,
    newest first."""
    if int(tl.offsets[-1]) == 0:  # no event at all (a request batch of users without history)
        empty = np.zeros((len(users), seq_len), np.int64)
        return empty, empty.copy(), np.zeros((len(users), seq_len), np.float32)
    first = np.asarray(tl.offsets[:-1])[users]
    pos = seq_end[:, None] - 1 - np.arange(seq_len)[None, :]  # newest first
    valid = pos >= first[:, None]
    pos = np.where(valid, pos, 0)
    action = np.where(valid, np.asarray(tl.action)[pos].astype(np.int64) + 1, 0)
    item = np.where(valid, np.asarray(tl.item)[pos].astype(np.int64), 0)
    age = np.where(valid, (t[:, None] - np.asarray(tl.ts)[pos]).astype(np.float32), 0.0).astype(np.float32)
    return action, item, age


def build_rank_batch(rd: RankData, tl: Timelines, requests: np.ndarray, seq_len: int,
                     rows: np.ndarray | None = None, row_weight: np.ndarray | None = None,
                     v2: StreamSpec | None = None, features: np.ndarray | None = None) -> RankBatch:
    """Requests (data indices) and candidate rows (data indices; default: every candidate of those requests);
    with `v2`, also each request's TransAct V2 streams; with `features` ([all rows of rd, F]), the rows' point-in-time
    features."""
    requests = np.asarray(requests, dtype=np.int64)
    if rows is None:
        rows, _ = rd.candidate_rows(requests)
    local = np.full(rd.n_requests, -1, np.int64)
    local[requests] = np.arange(len(requests))
    row_request = local[rd.cand_request[rows]]
    if (row_request < 0).any():
        raise ValueError("a candidate row's request is not in the batch")
    action, item, age = sequence_arrays(tl, rd.request_user[requests], rd.seq_end[requests], rd.request_t[requests],
                                        seq_len)
    visible = pf_visible(rd, requests)
    return RankBatch(
        seq_action=torch.from_numpy(action), seq_item=torch.from_numpy(item), seq_age=torch.from_numpy(age),
        user_vec=torch.from_numpy(np.ascontiguousarray(rd.user_vectors[requests], dtype=np.float32)
                                  * visible[:, None]),
        has_vector=torch.from_numpy(visible),
        hour=torch.from_numpy(rd.hour[requests]), surface=torch.from_numpy(rd.surface[requests] + 1),
        row_request=torch.from_numpy(row_request), cand_item=torch.from_numpy(rd.cand_item[rows]),
        labels=torch.from_numpy(rd.labels[rows]),
        weight=torch.from_numpy(np.ones(len(rows), np.float32) if row_weight is None
                                else row_weight[rows].astype(np.float32)),
        streams=None if v2 is None else v2.tensors(tl, rd.request_user[requests], rd.seq_end[requests]),
        features=None if features is None else torch.from_numpy(np.ascontiguousarray(features[rows], np.float32)),
        user=torch.from_numpy(rd.request_user[requests].astype(np.int64)))
