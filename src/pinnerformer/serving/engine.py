"""What the service computes, without HTTP: events in, per-head scores and recommendations out (the serving
path of the TransAct papers: realtime events are visible to the next request).

A `Bundle` is one loaded set of models — the ranker (its run, ranking data and dataset), the FAISS item index — and
is never changed once built: a hand-over builds a new one and swaps the reference, and every request takes the
reference once, so no request mixes two versions. The online store holds what changes during the day: each
user's realtime events (written by `ingest`, visible to the very next request) and the published day version's
embeddings and lifelong sequences (written by `publish_day`).

A request's sequence is the user's lifelong blob of the store's current day version (their dataset history up to
the end of that day) followed by their realtime events from the end of that day on, all strictly before the
request's time: the same rule as `rank score`, so the same inputs give the same scores (tested). Its point-in-time
features count the same events: the day version's dataset before its end, indexed once per version, and the
store's counters of the events acknowledged from that end on (`request_features`, `features.online`): the values
`rank score` gives once the daily job has appended those events to the dataset (tested on both stores). Its PinnerFormer
feature is the day version's "ranking" vector (the ranker's own feature model, actions before the next day);
retrieval queries the index with the "retrieval" vector (the run behind the index).

Cold start: a user without a retrieval vector gets the items most similar to their newest realtime events (the
index's item-to-item neighbours), and without any event the most popular items of the dataset's last 7 days.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pinnerformer.data.clock import DAY
from pinnerformer.data.timelines import Timelines
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.ranking import utility, v2_spec_for
from pinnerformer.features.online import Delta, online_table
from pinnerformer.features.point_in_time import EventLog, FeatureConfig, FeatureTable, Queries, feature_table
from pinnerformer.features.rank_batch import RankBatch, sequence_arrays
from pinnerformer.ranking.run import RankRun
from pinnerformer.retrieval.index import ItemIndex
from pinnerformer.serving.store import EVENT, OnlineStore, events

POPULAR_DAYS = 7


class UnknownInput(PinnerformerError):
    """An unknown user, item, action or surface: 404 / 400 with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RankRequest:
    user: str
    items: np.ndarray  # item codes
    t: int
    surface: int  # code + 1, 0: none


@dataclass
class Bundle:
    """Models loaded together, read-only once built."""

    workdir: Path
    run: RankRun
    model: torch.nn.Module
    index: ItemIndex | None
    device: torch.device
    version: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.rd = self.run.data()
        # the dataset as it is now: the one the ranker was trained on, or grown from it by the daily job (ids keep
        # their codes); items that arrived since have no row in the ranker's item tables
        self.ds = self.rd.dataset(descendants=True)
        self.ranker_items = int(self.rd.item_vectors.shape[0])
        m = self.ds.manifest
        self.heads = self.rd.heads
        self.actions = m.action_names()
        self.surfaces = list(m.surfaces)
        self.integer_user_ids = self.ds.users["user_id"].dtype.is_integer()
        self.user_ids = self.ds.users["user_id"].cast(pl.String).to_list()
        self.user_code = {u: i for i, u in enumerate(self.user_ids)}
        self.item_ids = self.ds.items["item_id"].cast(pl.String).to_list()
        self.item_code = {x: i for i, x in enumerate(self.item_ids)}
        self.titles = self.ds.items["text"].to_list() if "text" in self.ds.items.columns else [None] * len(
            self.item_ids)
        self.spec = v2_spec_for(self.model, self.rd, self.actions, m.positive_codes)
        self.seq_len = self.model.cfg.transact.seq_len
        tl = self.ds.timelines
        recent = np.asarray(tl.ts) >= int(np.asarray(tl.ts).max(initial=0)) - POPULAR_DAYS * DAY
        positive = np.isin(np.asarray(tl.action), list(m.positive_codes))
        counts = np.bincount(np.asarray(tl.item)[recent & positive], minlength=len(self.item_ids))
        self.popular = np.argsort(-counts, kind="stable")
        self.popular = self.popular[self.popular < self.ranker_items]
        # index rows <-> item codes (an item of the index the ranker's dataset lacks maps to None)
        index_ids = [] if self.index is None else self.index.items["item_id"].cast(pl.String).to_list()
        self.row_item = [self.item_code.get(x) for x in index_ids]
        self.item_row = {c: r for r, c in enumerate(self.row_item) if c is not None}
        self.feature_logs: dict = {}

    def feature_log(self, version: str | None):
        return _feature_log(self, version)


def _feature_log(b: "Bundle", version: str | None):
    """The static part of the point-in-time features online: the dataset's events before the end of the served day
    version (indexed once per version); the store's counters hold the events acknowledged from that end on
    (`request_features`)."""
    from pinnerformer.features.rank_features import rank_event_log

    key = version or "none"
    if key not in b.feature_logs:
        b.feature_logs.clear()  # one day version at a time
        b.feature_logs[key] = rank_event_log(b.rd, b.ds, until=version_end(version) if version else None)
    return b.feature_logs[key]


def is_integer_id(text: str) -> bool:
    """An id that an integer-keyed dataset stores as the same integer (no sign, no leading zeros, no spaces)."""
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0")) and len(text) <= 18


def load_bundle(workdir: Path, device: torch.device | None = None) -> Bundle:
    """The quickstart's (or the daily job's) work directory: rank-run/ (the ranker, its ranking data and dataset),
    index/ (the FAISS item index)."""
    run_dir = workdir / "rank-run"
    if not run_dir.is_dir():
        raise PinnerformerError(f"{workdir}: no rank-run/ (run `pinnerformer quickstart --workdir {workdir}` first, "
                                "or train a ranker into it with `pinnerformer rank train --output "
                                f"{run_dir}`)")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import faiss

    # one query at a time: FAISS's own OpenMP pool would only spin against torch's on the same cores
    faiss.omp_set_num_threads(1)
    run = RankRun(run_dir)
    if run.config.learner != "neural":
        raise PinnerformerError(f"{run_dir} is a gradient-boosted run (rank train --model gbdt): the service serves "
                                "a neural ranker (train one into rank-run/)")
    model = run.load_model(run.data()).to(device).eval()
    index = ItemIndex.open(workdir / "index") if (workdir / "index").is_dir() else None
    ckpt = run_dir / "checkpoints" / "best.pt"
    version = {"ranker": f"{run_dir.name}@{int(ckpt.stat().st_mtime)}",
               "index": (index.manifest.index_sha256 or "unhashed")[:16] if index is not None else "none"}
    return Bundle(workdir, run, model, index, device, version)


def day_version(b: Bundle, day: dt.date) -> str:
    """"<day>.<the ranker's feature model, 8 hex>.<the dataset, 8 hex>": a new feature model, or a dataset that grew
    since (late events of that day appended), gets a version of its own."""
    return (f"{day.isoformat()}.{str(b.rd.manifest.pinnerformer['checkpoint_sha256'])[:8]}"
            f".{b.ds.manifest.fingerprint[:8]}")


def version_end(version: str) -> int:
    """The end (Unix s) of a day version: its lifelong blobs hold the events before it."""
    return int(dt.datetime.combine(dt.date.fromisoformat(version[:10]) + dt.timedelta(days=1), dt.time(),
                                   dt.timezone.utc).timestamp())


def publish_day(b: Bundle, store: OnlineStore, day: dt.date, retrieval: dict[str, np.ndarray] | None = None,
                log=print) -> str:
    """Write and publish the day version `day`: each dataset user's lifelong blob (events before the next day),
    "ranking" vector (the ranker's feature model on those events) and, where given, "retrieval" vector."""
    from pinnerformer.data.requests import PF_RUN
    from pinnerformer.models.embedding import embed_users
    from pinnerformer.runs import RunDir

    version = day_version(b, day)
    end = version_end(version)
    tl = b.ds.timelines
    first = np.asarray(tl.offsets[:-1])
    stop = np.array([int(np.searchsorted(np.asarray(tl.ts[a:z]), end)) + a
                     for a, z in zip(first, np.asarray(tl.offsets[1:]))])
    has = stop > first
    pf_path = str(b.rd.manifest.pinnerformer["run"])
    pf = RunDir(b.rd.path / PF_RUN if pf_path == PF_RUN else Path(pf_path))
    users = np.flatnonzero(has)
    vec = embed_users(pf.load_model(b.ds), tl, first[users], stop[users], torch.device("cpu")).numpy()
    ranking = np.full((len(b.user_ids), vec.shape[1]), np.nan, np.float32)
    ranking[users] = vec
    vectors = {"ranking": ranking}
    if retrieval:
        dim = len(next(iter(retrieval.values())))
        r = np.full((len(b.user_ids), dim), np.nan, np.float32)
        for uid, v in retrieval.items():
            if uid in b.user_code:
                r[b.user_code[uid]] = v
        vectors["retrieval"] = r
    lifelong = {b.user_ids[u]: events(tl.item[first[u]:stop[u]], tl.action[first[u]:stop[u]],
                                      tl.ts[first[u]:stop[u]], tl.surface[first[u]:stop[u]],
                                      tl.duration[first[u]:stop[u]]) for u in users}
    store.put_daily(version, b.user_ids, vectors, lifelong)
    store.publish(version)
    log(f"published day version {version}: {len(users):,} users with a vector and a lifelong sequence")
    return version


def request_timelines(sequences: list[np.ndarray]) -> Timelines:
    """One Timelines 'user' per request: its events (EVENT records, time-ordered)."""
    allev = np.concatenate(sequences) if sequences else np.zeros(0, EVENT)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    return Timelines(offsets=offsets, item=allev["item"].astype(np.int32), action=allev["action"].astype(np.int16),
                     ts=allev["ts"].astype(np.int64), surface=allev["surface"].astype(np.int16),
                     duration=allev["duration"].astype(np.float32))


def user_sequence(store: OnlineStore, user: str, t: int, version: str | None) -> tuple[np.ndarray, dict]:
    """The user's events strictly before t (lifelong blob of `version`, then realtime events from its end on),
    time-ordered, and their day-version vectors."""
    vectors, life = store.daily(user, version) if version else ({}, np.zeros(0, EVENT))
    realtime = store.realtime(user)
    if version:  # earlier ones are in the blob, unless acknowledged after the daily job took their day
        early = realtime["ts"] < version_end(version)
        if early.any():
            known = set(zip(life["item"].tolist(), life["action"].tolist(), life["ts"].tolist()))
            early &= np.array([(int(e["item"]), int(e["action"]), int(e["ts"])) in known for e in realtime])
        realtime = realtime[~early]
    if len(realtime) > 1:  # an exact duplicate (item, action, second) is one event, as in the dataset and counters
        _, first = np.unique(np.stack([realtime["item"], realtime["action"], realtime["ts"]], 1), axis=0,
                             return_index=True)
        realtime = realtime[np.sort(first)]
    seq = np.concatenate([life, realtime])
    seq = seq[seq["ts"] < t]
    return seq[np.argsort(seq["ts"], kind="stable")], vectors


def request_features(b: Bundle, store: OnlineStore, requests: list[RankRequest], version: str | None
                     ) -> FeatureTable:
    """The point-in-time features of the requests' candidate rows: the served day version's log (the dataset's
    events before its end E) and the store's counters of the events acknowledged from E on, combined by
    `features.online` into the values `rank score` gives on the dataset grown by those events. Without a day
    version, the dataset's events alone."""
    users = list(dict.fromkeys(r.user for r in requests))
    # a user the dataset lacks gets a code of their own, past its users' (no event of the static log has it)
    code = {u: b.user_code.get(u, len(b.user_ids) + j) for j, u in enumerate(users)}
    sizes = [len(r.items) for r in requests]
    t = np.array([r.t for r in requests], np.int64)
    q = Queries(np.repeat([code[r.user] for r in requests], sizes), np.concatenate([r.items for r in requests]),
                np.repeat(t, sizes), np.repeat(np.arange(len(requests)), sizes))
    static, cfg = b.feature_log(version), b.model.feature_config
    if version is None:
        return feature_table(static, q, cfg)
    return online_features(static, store, version_end(version), q, code, cfg)


def online_features(static: EventLog, store: OnlineStore, since: int, q: Queries, users: dict[str, int],
                    cfg: FeatureConfig) -> FeatureTable:
    """The rows `q` (of the users {id: code}) from the static log (the events before `since`) and the store's
    counters from `since` on, read in one snapshot."""
    times = np.unique(q.t)
    c = store.counters(since, list(users), np.unique(q.item).tolist(), times.tolist(), len(static.action_names))
    delta = Delta.build(since, {code: c.users[u] for u, code in users.items()}, c.items, times, c.before)
    return online_table(static, delta, q, cfg)


@torch.no_grad()
def score(b: Bundle, store: OnlineStore, requests: list[RankRequest], version: str | None) -> list[np.ndarray]:
    """Per request, [candidates, heads] probabilities: all requests in one forward pass (micro-batching)."""
    seqs, vecs = zip(*(user_sequence(store, r.user, r.t, version) for r in requests)) if requests else ((), ())
    # actions on items newer than the ranker are left out: it has no row for them (they count once it is retrained)
    tl = request_timelines([q[q["item"] < b.ranker_items] for q in seqs])
    R = len(requests)
    ends = np.asarray(tl.offsets[1:])
    t = np.array([r.t for r in requests], np.int64)
    action, item, age = sequence_arrays(tl, np.arange(R), ends, t, b.seq_len)
    pf_dim = int(b.rd.pf_item_vectors.shape[1])
    user_vec = np.zeros((R, pf_dim), np.float32)
    has = np.zeros(R, bool)
    for i, v in enumerate(vecs):
        if "ranking" in v:
            user_vec[i], has[i] = v["ranking"], True
    sizes = [len(r.items) for r in requests]
    features = None
    if len(b.model.inputs.feature_names):
        features = torch.from_numpy(request_features(b, store, requests, version).values)
    batch = RankBatch(
        seq_action=torch.from_numpy(action), seq_item=torch.from_numpy(item), seq_age=torch.from_numpy(age),
        user_vec=torch.from_numpy(user_vec), has_vector=torch.from_numpy(has),
        hour=torch.from_numpy((t % DAY) // 3600),
        surface=torch.tensor([r.surface if r.surface < b.model.surface.num_embeddings else 0 for r in requests]),
        row_request=torch.from_numpy(np.repeat(np.arange(R), sizes)),
        cand_item=torch.from_numpy(np.concatenate([r.items for r in requests]).astype(np.int64)),
        labels=torch.zeros(sum(sizes), len(b.heads)), weight=torch.ones(sum(sizes)),
        streams=None if b.spec is None else b.spec.tensors(tl, np.arange(R), ends), features=features,
        user=torch.tensor([b.user_code.get(r.user, -1) for r in requests], dtype=torch.int64))
    probs = torch.sigmoid(b.model(batch.staged(b.device), shared_projection=True).float()).cpu().numpy()
    return np.split(probs, np.cumsum(sizes)[:-1])


def ranked(b: Bundle, items: np.ndarray, probs: np.ndarray, k: int | None = None) -> list[dict]:
    """Candidates with per-head scores and the served score (positive heads minus negative ones), best first."""
    u = utility(probs, b.heads)
    order = np.argsort(-u, kind="stable")[:k]
    return [{"item": b.item_ids[items[j]], "title": b.titles[items[j]], "score": float(u[j]),
             "heads": {h.name: float(probs[j, i]) for i, h in enumerate(b.heads)}} for j in order]


def candidates(b: Bundle, store: OnlineStore, user: str, t: int, version: str | None, n: int
               ) -> tuple[np.ndarray, str]:
    """Up to n items the user has not acted on, and where they came from (retrieval | similar-items | popular)."""
    seq, vectors = user_sequence(store, user, t, version)
    seen = set(seq["item"].tolist())
    if b.index is not None and "retrieval" in vectors:
        source, rows = "retrieval", b.index.search(vectors["retrieval"][None], n + len(seen))[1][0]
        found = [b.row_item[r] for r in rows]
    elif b.index is not None and any(i in b.item_row for i in seq["item"].tolist()):
        source, found = "similar-items", []
        recent = [b.item_row[i] for i in seq["item"][::-1].tolist() if i in b.item_row][:5]
        rows = b.index.search(np.stack([b.index.vector(r) for r in recent]), n + len(seen))[1]
        for col in range(rows.shape[1]):  # interleave the neighbours of each recent item
            found += [b.row_item[r] for r in rows[:, col]]
    else:
        source, found = "popular", list(b.popular[:n + len(seen)])
    out = list(dict.fromkeys(i for i in found if i is not None and i not in seen and i < b.ranker_items))[:n]
    return np.array(out, np.int64), source
