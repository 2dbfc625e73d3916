"""TransAct V2's three sequences per request, from the dataset's timelines (all strictly before the request, oldest
first, padded at the end). One token per item: every action the user took on an item before the request is one
multi-hot token (a Taobao page view, cart and buy of one item: one token with three action bits), placed in time at
the item's newest explicit action (or, for an item only shown, its newest impression):

    realtime     the `realtime_len` most recent tokens of items the user acted on explicitly
    lifelong     the explicit tokens before those, the newest `lifelong_max` of them (older ones are cut, counted)
    impressions  the newest `impressions_max` tokens of items only shown and not engaged with (MIND's not-clicked
                 impressions, Taobao's page views, MovieLens's neutral ratings: the nearest analogue)

An action is explicit when it is one of the dataset's positive actions or a head names it (a hide is explicit).
Action sets are stored as bit masks (at most 62 action types) and expanded to multi-hot at batch time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pinnerformer.data.timelines import Timelines


MAX_ACTIONS = 62  # action sets are int64 bit masks


@dataclass
class StreamArrays:
    item: np.ndarray  # [R, S] int64 (0 at padding)
    action: np.ndarray  # [R, S] int64 bit mask of the token's actions (0 at padding)
    surface: np.ndarray  # [R, S] int64 surface code + 1 of the token's placing event (0: none or padding)
    valid: np.ndarray  # [R, S] bool

    def tensors(self, n_actions: int) -> dict[str, torch.Tensor]:
        """item, actions (multi-hot [R, S, A] float), surface, valid as tensors."""
        multi_hot = ((self.action[..., None] >> np.arange(n_actions)) & 1).astype(np.float32)
        return {"item": torch.from_numpy(self.item), "actions": torch.from_numpy(multi_hot),
                "surface": torch.from_numpy(self.surface), "valid": torch.from_numpy(self.valid)}


@dataclass
class RequestStreams:
    lifelong: StreamArrays
    realtime: StreamArrays
    impressions: StreamArrays
    lifelong_cut: int  # explicit tokens older than the lifelong window, left out (summed over the requests)


def _pack(tl: Timelines, rows: list[tuple[np.ndarray, np.ndarray]], width: int) -> StreamArrays:
    """rows: per request (event positions placing the tokens, the tokens' action masks)."""
    R = len(rows)
    item = np.zeros((R, width), np.int64)
    action = np.zeros((R, width), np.int64)
    surface = np.zeros((R, width), np.int64)
    valid = np.zeros((R, width), bool)
    for i, (pos, mask) in enumerate(rows):
        n = len(pos)
        item[i, :n] = np.asarray(tl.item)[pos]
        action[i, :n] = mask
        surface[i, :n] = np.asarray(tl.surface)[pos].astype(np.int64) + 1
        valid[i, :n] = True
    return StreamArrays(item, action, surface, valid)


def item_tokens(items: np.ndarray, bits: np.ndarray, explicit: np.ndarray) -> tuple[np.ndarray, ...]:
    """One user's events (oldest first) -> one token per item, in time order: (the placing event's index, the
    action mask, engaged). The placing event is the item's newest explicit one, or its newest when it has none."""
    uniq, inv = np.unique(items, return_inverse=True)
    mask = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(mask, inv, bits)
    engaged = np.zeros(len(uniq), bool)
    np.logical_or.at(engaged, inv, explicit)
    placing = explicit | ~engaged[inv]  # the events that may place their item's token
    last = np.full(len(uniq), -1, np.int64)
    np.maximum.at(last, inv[placing], np.flatnonzero(placing))
    order = np.argsort(last, kind="stable")
    return last[order], mask[order], engaged[order]


def request_streams(tl: Timelines, users: np.ndarray, seq_end: np.ndarray, explicit: np.ndarray,
                    realtime_len: int, lifelong_max: int, impressions_max: int) -> RequestStreams:
    """users [R], seq_end [R] (one past the newest event before each request), explicit [n_actions] bool."""
    if len(explicit) > MAX_ACTIONS:
        raise ValueError(f"{len(explicit)} action types: TransAct V2's streams hold at most {MAX_ACTIONS}")
    first = np.asarray(tl.offsets[:-1])
    all_items, all_actions = np.asarray(tl.item), np.asarray(tl.action).astype(np.int64)
    is_explicit = explicit[all_actions]
    life, real, imp, cut = [], [], [], 0
    for u, e in zip(users, seq_end):
        pos = np.arange(int(first[u]), int(e))
        at, mask, engaged = item_tokens(all_items[pos], np.left_shift(1, all_actions[pos]), is_explicit[pos])
        at = pos[at]
        exp, exp_mask = at[engaged], mask[engaged]
        n_real = min(realtime_len, len(exp))
        real.append((exp[len(exp) - n_real:], exp_mask[len(exp) - n_real:]))
        older, older_mask = exp[:len(exp) - n_real], exp_mask[:len(exp) - n_real]
        cut += max(0, len(older) - lifelong_max)
        keep = len(older) - min(lifelong_max, len(older))
        life.append((older[keep:], older_mask[keep:]))
        shown, shown_mask = at[~engaged], mask[~engaged]
        keep = len(shown) - min(impressions_max, len(shown))
        imp.append((shown[keep:], shown_mask[keep:]))
    width = lambda rows, cap: max(1, min(cap, max((len(r[0]) for r in rows), default=0)))  # noqa: E731
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
        out["lifelong.cut"] = torch.tensor(s.lifelong_cut)  # older explicit tokens beyond lifelong_max, left out
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
