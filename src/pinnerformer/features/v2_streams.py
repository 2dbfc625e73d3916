"""TransAct V2's three sequences per request, from the dataset's timelines (all strictly before the request, oldest
first, padded at the end):

    realtime     the `realtime_len` most recent explicit actions
    lifelong     the explicit actions before those, the newest `lifelong_max` of them (older ones are cut, counted)
    impressions  the newest `impressions_max` non-explicit events: items shown and not engaged with (MIND's
                 not-clicked impressions, Taobao's page views, MovieLens's neutral ratings: the nearest analogue)

An action is explicit when it is one of the dataset's positive actions or a head names it (a hide is explicit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pinnerformer.data.timelines import Timelines


@dataclass
class StreamArrays:
    item: np.ndarray  # [R, S] int64 (0 at padding)
    action: np.ndarray  # [R, S] int64 action code (-1 at padding)
    surface: np.ndarray  # [R, S] int64 surface code + 1 (0: none or padding)
    valid: np.ndarray  # [R, S] bool

    def tensors(self, n_actions: int) -> dict[str, torch.Tensor]:
        """item, actions (one-hot [R, S, A] float), surface, valid as tensors."""
        onehot = np.zeros((*self.action.shape, n_actions), np.float32)
        r, s = np.nonzero(self.valid)
        onehot[r, s, self.action[r, s]] = 1.0
        return {"item": torch.from_numpy(self.item), "actions": torch.from_numpy(onehot),
                "surface": torch.from_numpy(self.surface), "valid": torch.from_numpy(self.valid)}


@dataclass
class RequestStreams:
    lifelong: StreamArrays
    realtime: StreamArrays
    impressions: StreamArrays
    lifelong_cut: int  # explicit actions older than the lifelong window, left out (summed over the requests)


def _pack(tl: Timelines, rows: list[np.ndarray], width: int) -> StreamArrays:
    R = len(rows)
    item = np.zeros((R, width), np.int64)
    action = np.full((R, width), -1, np.int64)
    surface = np.zeros((R, width), np.int64)
    valid = np.zeros((R, width), bool)
    for i, pos in enumerate(rows):
        n = len(pos)
        item[i, :n] = np.asarray(tl.item)[pos]
        action[i, :n] = np.asarray(tl.action)[pos]
        surface[i, :n] = np.asarray(tl.surface)[pos].astype(np.int64) + 1
        valid[i, :n] = True
    return StreamArrays(item, action, surface, valid)


def request_streams(tl: Timelines, users: np.ndarray, seq_end: np.ndarray, explicit: np.ndarray,
                    realtime_len: int, lifelong_max: int, impressions_max: int) -> RequestStreams:
    """users [R], seq_end [R] (one past the newest event before each request), explicit [n_actions] bool."""
    first = np.asarray(tl.offsets[:-1])
    is_explicit = explicit[np.asarray(tl.action)]
    life, real, imp, cut = [], [], [], 0
    for u, e in zip(users, seq_end):
        pos = np.arange(int(first[u]), int(e))
        exp = pos[is_explicit[pos]]
        real.append(exp[len(exp) - min(realtime_len, len(exp)):])
        older = exp[:len(exp) - len(real[-1])]
        cut += max(0, len(older) - lifelong_max)
        life.append(older[len(older) - min(lifelong_max, len(older)):])
        shown = pos[~is_explicit[pos]]
        imp.append(shown[len(shown) - min(impressions_max, len(shown)):])
    width = lambda rows, cap: max(1, min(cap, max((len(r) for r in rows), default=0)))  # noqa: E731
    return RequestStreams(_pack(tl, life, width(life, lifelong_max)), _pack(tl, real, width(real, realtime_len)),
                          _pack(tl, imp, width(imp, impressions_max)), cut)


@dataclass(frozen=True)
class StreamSpec:
    """What a batch builder needs to cut the streams: the explicit action codes and the three lengths."""

    explicit: np.ndarray  # [n_actions] bool
    realtime_len: int
    lifelong_max: int
    impressions_max: int

    def tensors(self, tl: Timelines, users: np.ndarray, seq_end: np.ndarray) -> dict[str, torch.Tensor]:
        s = request_streams(tl, users, seq_end, self.explicit, self.realtime_len, self.lifelong_max,
                            self.impressions_max)
        n = len(self.explicit)
        out = {f"{name}.{k}": v for name in ("lifelong", "realtime", "impressions")
               for k, v in getattr(s, name).tensors(n).items()}
        out["lifelong.cut"] = torch.tensor(s.lifelong_cut)  # older explicit actions beyond lifelong_max, left out
        return out


def explicit_actions(action_names: list[str], positive: list[int], head_actions: list[list[str]]) -> np.ndarray:
    """[n_actions] bool: the positive actions and every action a head names."""
    out = np.zeros(len(action_names), bool)
    out[list(positive)] = True
    for acts in head_actions:
        out[[action_names.index(a) for a in acts]] = True
    return out


def stream_spec(action_names: list[str], positive: list[int], head_actions: list[list[str]], realtime_len: int,
                lifelong_max: int, impressions_max: int) -> StreamSpec:
    return StreamSpec(explicit_actions(action_names, positive, head_actions), realtime_len, lifelong_max,
                      impressions_max)
