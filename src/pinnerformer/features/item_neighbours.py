"""The candidate against what the user did to the items most like it: item-to-item collaborative filtering as
features (Sarwar et al., "Item-based collaborative filtering recommendation algorithms", WWW 2001). "This user gave
5 stars to the films people rate like this one" is the user-specific signal the item's own counters miss.

The similarity is a frozen snapshot, like the feature PinnerFormer: made from the events before
`log.neighbours_until` only (the ranking data's `pf_until`), so no row sees a similarity its own or later events
made; rows before that time get the values of a user with no history. Between items a and b, over the users who
acted on both (each user and item counted once):

    events with a value (ratings):  adjusted cosine of the values centred on each user's mean value
    otherwise:                      cosine of the binary user x item matrix
    sim(a, b) = cosine(a, b) * co(a, b) / (co(a, b) + neighbours_shrink)      co: the users who acted on both

and each item keeps its `neighbours_kept` most similar items (similarity > 0; ties to the smaller item code).

Per row (user u, candidate c, time t): among u's last `neighbours_n` actions before t, the `neighbours_k` with the
largest sim(c, item) > 0 (ties to the newer action), each weighing w = sim:

    nb.weight         log1p(sum w)                                   how near the user's history is to c
    nb.<head>         (sum w * [action in head] + r) / (sum w + 1)    r: the head's share of u's same last actions
    nb.<head>.lift    nb.<head> - r                                   more (or less) than the user's usual
    nb.value          sum w * (v - mean v) / (sum w + 1)             (value data) mean v: over u's same actions
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pinnerformer.features.point_in_time import EventLog, FeatureConfig, GroupedTimes, Queries, before

CHUNK = 1024  # rows at a time: [CHUNK, neighbours_n] lookups


class Neighbours:
    """Each item's most similar items, as sorted composite keys a * n_items + b with their similarities."""

    def __init__(self, keys: np.ndarray, sims: np.ndarray, n_items: int):
        self.keys, self.sims, self.n_items = np.asarray(keys, np.int64), np.asarray(sims, np.float64), n_items

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """sim(a, b) for arrays of item pairs; 0 where b is not among a's neighbours."""
        key = np.asarray(a, np.int64) * self.n_items + np.asarray(b, np.int64)
        if not len(self.keys):
            return np.zeros(key.shape)
        pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        return np.where(self.keys[pos] == key, self.sims[pos], 0.0)


def _user_item(log: EventLog, until: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(user, item, value) once per (user, item) acted on before `until`; value: the pair's mean value, centred on
    the user's mean (None without values)."""
    # indexed, not read whole: the online union log's arrays are joined views (features/online.py)
    keep = np.flatnonzero(np.asarray(log.ts[np.arange(len(log.ts))]) < until)
    user, item = np.asarray(log.user[keep], np.int64), np.asarray(log.item[keep], np.int64)
    pair, inverse = np.unique(user * log.n_items + item, return_inverse=True)
    pu, pi = pair // log.n_items, pair % log.n_items
    if log.value is None:
        return pu, pi, None
    v = np.asarray(log.value, np.float64)[keep]
    ok = ~np.isnan(v)
    if ok.mean() < 0.5 if len(v) else True:
        return pu, pi, None
    s = np.bincount(inverse[ok], weights=v[ok], minlength=len(pair))
    n = np.bincount(inverse[ok], minlength=len(pair))
    rated = n > 0
    pu, pi, pv = pu[rated], pi[rated], s[rated] / n[rated]
    users, uinv = np.unique(pu, return_inverse=True)
    umean = np.bincount(uinv, weights=pv) / np.bincount(uinv)
    return pu, pi, pv - umean[uinv]


def build_neighbours(log: EventLog, until: int, kept: int, shrink: float) -> Neighbours:
    pu, pi, pv = _user_item(log, until)
    n_users = int(pu.max()) + 1 if len(pu) else 1
    shape = (n_users, log.n_items)
    binary = sp.csr_matrix((np.ones(len(pu)), (pu, pi)), shape=shape)
    m = binary if pv is None else sp.csr_matrix((pv, (pu, pi)), shape=shape)
    co = (binary.T @ binary).tocoo()
    dot = (m.T @ m).tocsr()
    norm = np.sqrt(np.asarray(m.multiply(m).sum(0)).ravel())
    a, b, c = co.row.astype(np.int64), co.col.astype(np.int64), co.data
    off = a != b
    a, b, c = a[off], b[off], c[off]
    d = np.asarray(dot[a, b]).ravel() if len(a) else np.zeros(0)
    sim = d / np.maximum(norm[a] * norm[b], 1e-12) * c / (c + shrink)
    pos = sim > 0
    a, b, sim = a[pos], b[pos], sim[pos]
    order = np.lexsort((b, -sim, a))  # per source item: the most similar first, ties to the smaller code
    a, b, sim = a[order], b[order], sim[order]
    starts = np.searchsorted(a, a, side="left")
    top = (np.arange(len(a)) - starts) < kept
    a, b, sim = a[top], b[top], sim[top]
    key = a * log.n_items + b
    order = np.argsort(key)
    return Neighbours(key[order], sim[order], log.n_items)


def neighbours(log: EventLog, cfg: FeatureConfig) -> Neighbours:
    """The log's similarity snapshot (built once per log and config; the online union log shares the static one's)."""
    store = log.__dict__.setdefault("item_neighbours", {})
    key = (log.neighbours_until, cfg.neighbours_kept, cfg.neighbours_shrink)
    if key not in store:
        store[key] = build_neighbours(log, log.neighbours_until, cfg.neighbours_kept, cfg.neighbours_shrink)
    return store[key]


def _times(log: EventLog) -> tuple[GroupedTimes, np.ndarray]:
    if "item_neighbours" not in log.cache:
        value = np.full(len(log.ts), np.nan) if log.value is None else np.asarray(log.value, np.float64)
        log.cache["item_neighbours"] = (log.grouped("user"), value)
    return log.cache["item_neighbours"]


def _values(log: EventLog, cfg: FeatureConfig, nb: Neighbours, items, actions, values, valid, cand, known
            ) -> dict[str, np.ndarray]:
    """The columns from each row's [rows, n] last actions (newest first; valid: where one is)."""
    valid = valid & known[:, None]
    sim = np.where(valid, nb.lookup(np.repeat(cand[:, None], items.shape[1], 1), items), 0.0)
    # the k largest per row, ties to the newer action (a stable sort over newest-first columns)
    take = np.argsort(-sim, axis=1, kind="stable")[:, :cfg.neighbours_k]
    w = np.take_along_axis(sim, take, 1)
    total = w.sum(1)
    n = np.maximum(valid.sum(1), 1)
    out = {"nb.weight": np.log1p(total)}
    for name, codes in log.heads:
        hit = np.isin(actions, codes) & valid
        usual = hit.sum(1) / n  # 0 for a user with no action
        share = ((w * np.take_along_axis(hit, take, 1)).sum(1) + usual) / (total + 1.0)
        out[f"nb.{name}"], out[f"nb.{name}.lift"] = share, share - usual
    if log.value is not None:
        has = valid & ~np.isnan(values)
        mean = np.where(has, values, 0.0).sum(1) / np.maximum(has.sum(1), 1)
        dev = np.where(has, values - mean[:, None], 0.0)
        out["nb.value"] = (w * np.take_along_axis(dev, take, 1)).sum(1) / (total + 1.0)
    return out


def columns(log: EventLog, q: Queries, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    if log.neighbours_until is None:
        return {}
    nb = neighbours(log, cfg)
    times, value = _times(log)
    parts = []
    for s in range(0, max(len(q), 1), CHUNK):
        t, cand = q.t[s:s + CHUNK], q.item[s:s + CHUNK]
        # each (user, t)'s last actions found once, then given to its rows
        users, inverse = q.part(s, s + CHUNK).per_user()
        events, valid = times.window(users.user, users.t, cfg.neighbours_n)
        items, actions, values = (x[events][inverse] for x in (log.item, log.action, value))
        parts.append(_values(log, cfg, nb, items, actions, values, valid[inverse], cand, t >= log.neighbours_until))
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float64) for k in parts[0]}


def reference_neighbours(log: EventLog, until: int, kept: int, shrink: float) -> np.ndarray:
    """Dense [items, items] similarities, each row cut to its `kept` largest (tests only: small data)."""
    ok = before(log, until)
    users = sorted(set(log.user[ok].tolist()))
    m = np.zeros((len(users), log.n_items))
    seen = np.zeros_like(m, bool)
    ur = {u: i for i, u in enumerate(users)}
    has_value = log.value is not None and (~np.isnan(log.value[ok])).mean() >= 0.5 if ok.any() else False
    sums, counts = np.zeros_like(m), np.zeros_like(m)
    for e in np.flatnonzero(ok):
        r, i = ur[int(log.user[e])], int(log.item[e])
        seen[r, i] = True
        if has_value and not np.isnan(log.value[e]):
            sums[r, i] += log.value[e]
            counts[r, i] += 1
    if has_value:
        seen = counts > 0
        mean = np.where(seen, sums / np.maximum(counts, 1), 0.0)
        user_mean = mean.sum(1) / np.maximum(seen.sum(1), 1)
        m = np.where(seen, mean - user_mean[:, None], 0.0)
    else:
        m = seen.astype(float)
    b = seen.astype(float)
    co = b.T @ b
    norm = np.sqrt((m * m).sum(0))
    sim = (m.T @ m) / np.maximum(np.outer(norm, norm), 1e-12) * co / (co + shrink)
    np.fill_diagonal(sim, 0.0)
    sim[(sim <= 0) | (co == 0)] = 0.0
    for a in range(log.n_items):
        order = sorted(range(log.n_items), key=lambda j: (-sim[a, j], j))
        sim[a, order[kept:]] = 0.0
    return sim


def reference(log: EventLog, q: Queries, i: int, cfg: FeatureConfig) -> dict[str, float]:
    if log.neighbours_until is None:
        return {}
    key = ("item_neighbours.reference", log.neighbours_until, cfg.neighbours_kept, cfg.neighbours_shrink)
    if key not in log.cache:
        log.cache[key] = reference_neighbours(log, *key[1:])
    sim = log.cache[key]
    t = int(q.t[i])
    mine = np.flatnonzero(before(log, t) & (log.user == q.user[i]))
    mine = mine[np.argsort(log.ts[mine], kind="stable")][::-1][:cfg.neighbours_n]  # newest first
    if t < log.neighbours_until:
        mine = mine[:0]
    weights = [(float(sim[q.item[i], log.item[e]]), k, e) for k, e in enumerate(mine)]
    top = [(w, e) for w, _, e in sorted(weights, key=lambda x: (-x[0], x[1]))[:cfg.neighbours_k] if w > 0]
    total = sum(w for w, _ in top)
    out = {"nb.weight": float(np.log1p(total))}
    for name, codes in log.heads:
        hits = [int(log.action[e]) in set(codes.tolist()) for e in mine]
        usual = sum(hits) / len(mine) if len(mine) else 0.0
        share = (sum(w for w, e in top if int(log.action[e]) in set(codes.tolist())) + usual) / (total + 1.0)
        out[f"nb.{name}"], out[f"nb.{name}.lift"] = share, share - usual
    if log.value is not None:
        vals = [float(log.value[e]) for e in mine if not np.isnan(log.value[e])]
        mean = sum(vals) / len(vals) if vals else 0.0
        out["nb.value"] = sum(w * (float(log.value[e]) - mean) for w, e in top
                              if not np.isnan(log.value[e])) / (total + 1.0)
    return out
