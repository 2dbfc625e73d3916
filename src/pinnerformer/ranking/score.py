"""`pinnerformer rank score`: one request scored — a user, a time and candidate item ids in, per-head scores out.

The request's features follow the same rules as the ranking data: the realtime sequence is the user's actions
strictly before the time; the PinnerFormer vector comes from a daily snapshot of an earlier day made by the same
PinnerFormer checkpoint as the ranking data's (`--snapshot`; another model's snapshot or one of the request's day
or later is refused), or, without a snapshot, is computed by that checkpoint from the actions before the request's
UTC day. The sequence part of TransAct's first projection is computed once for the request (shared projection).

The dataset may have grown since the ranking data was made (`pinnerformer daily`: appends keep every code), as the
service's does: the request then reads the grown dataset's events, the service's rule for items newer than the
ranker too (a candidate among them is refused, an action on one is left out of the sequence).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pinnerformer.data.clock import DAY, utc_day
from pinnerformer.data.requests import PF_RUN, RankData
from pinnerformer.data.timelines import Timelines
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.ranking import utility, v2_spec_for
from pinnerformer.features.point_in_time import Queries, feature_table
from pinnerformer.features.rank_batch import RankBatch, sequence_arrays
from pinnerformer.features.rank_features import rank_event_log
from pinnerformer.models.embedding import embed_users
from pinnerformer.ranking.run import RankRun
from pinnerformer.runs import RunDir


def parse_time(text: str) -> int:
    """Unix seconds, or an ISO date/time (UTC unless it says otherwise)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PinnerformerError(f"--time: {text!r} is neither Unix seconds nor an ISO date/time (e.g. "
                                "2018-09-01T12:00:00)") from None
    return int((t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp())


def snapshot_vector(snapshot_dir: Path, rd: RankData, user_id, t: int) -> np.ndarray | None:
    from pinnerformer.inference.snapshot import Snapshot

    snap = Snapshot.open(snapshot_dir)
    want = str(rd.manifest.pinnerformer["checkpoint_sha256"])
    if snap.manifest.checkpoint.sha256 != want:
        raise PinnerformerError(f"snapshot {snapshot_dir} was made by another PinnerFormer model (checkpoint "
                                f"{snap.manifest.checkpoint.sha256[:16]}…); the ranker was trained with "
                                f"{want[:16]}… (ranking data {rd.path})")
    if snap.day >= utc_day(t):
        raise PinnerformerError(f"snapshot {snapshot_dir} is as of {snap.manifest.as_of}, not before the request's "
                                f"day {utc_day(t)}: it holds actions of the request's day or later (leakage); use the "
                                "snapshot of an earlier day")
    snap.verify()
    return np.asarray(snap.vectors[snap.lookup(user_id)], dtype=np.float32)


def score_request(run_dir: Path, user_id: str, time: str, item_ids: list[str], snapshot: Path | None = None,
                  surface: str | None = None) -> pl.DataFrame:
    run = RankRun(run_dir)
    rd = run.data()
    ds = rd.dataset(descendants=True)
    model = run.load_model(rd)
    if not isinstance(model, torch.nn.Module):
        raise PinnerformerError(f"{run_dir} is a gradient-boosted run: `rank score` scores a neural ranker "
                                "(score the trees with `rank evaluate`)")
    t = parse_time(time)
    users = ds.users["user_id"].cast(pl.String).to_list()
    if str(user_id) not in users:
        raise PinnerformerError(f"--user {user_id!r}: no such user in dataset {ds.path}")
    u = users.index(str(user_id))
    index_of = {str(x): i for i, x in enumerate(ds.items["item_id"].cast(pl.String).to_list())}
    unknown = [i for i in item_ids if str(i) not in index_of]
    if unknown:
        raise PinnerformerError(f"--items: unknown item id(s) {', '.join(map(repr, unknown[:5]))} "
                                f"(not in dataset {ds.path})")
    if not item_ids:
        raise PinnerformerError("--items: a request needs at least one candidate")
    twice = list(dict.fromkeys(i for n, i in enumerate(item_ids) if i in item_ids[:n]))
    if twice:
        raise PinnerformerError(f"--items: candidate id(s) given more than once: {', '.join(map(repr, twice[:5]))} "
                                "(a request ranks each candidate once)")
    items = np.array([index_of[str(i)] for i in item_ids], dtype=np.int64)
    n_ranker = int(rd.item_vectors.shape[0])
    newer = [i for i, c in zip(item_ids, items) if c >= n_ranker]
    if newer:
        raise PinnerformerError(f"--items: {', '.join(map(repr, newer[:5]))} arrived after the ranker was trained "
                                f"(it knows the first {n_ranker:,} items of {ds.path}): retrain it to rank them")
    surfaces = ds.manifest.surfaces
    if surface is not None and surface not in surfaces:
        raise PinnerformerError(f"--surface {surface!r}: unknown surface (this dataset records "
                                + (f"these: {', '.join(surfaces)})" if surfaces else "none)"))
    surface_code = 0 if surface is None else surfaces.index(surface) + 1  # 0: not recorded
    tl = ds.timelines
    a, b = int(tl.offsets[u]), int(tl.offsets[u + 1])
    ts = np.asarray(tl.ts[a:b])
    seq_end = a + int(np.searchsorted(ts, t, side="left"))
    snap_end = a + int(np.searchsorted(ts, (t // DAY) * DAY, side="left"))
    known = a + np.flatnonzero(np.asarray(tl.item[a:seq_end]) < n_ranker)  # the actions the ranker has rows for
    seq = Timelines(np.array([0, len(known)]), *(np.asarray(getattr(tl, c))[known] for c in
                                                 ("item", "action", "ts", "surface", "duration")))
    if snapshot is not None:
        vec = snapshot_vector(snapshot, rd, ds.users["user_id"][u], t)
    elif snap_end > a:
        pf_path = rd.manifest.pinnerformer["run"]
        pf = RunDir(rd.path / PF_RUN if pf_path == PF_RUN else Path(str(pf_path)))
        vec = embed_users(pf.load_model(ds), tl, np.array([a]), np.array([snap_end]), torch.device("cpu"))[0].numpy()
    else:
        vec = None
    L = model.cfg.transact.seq_len
    action, item, age = sequence_arrays(seq, np.array([0]), np.array([len(known)]), np.array([t]), L)
    batch = RankBatch(
        seq_action=torch.from_numpy(action), seq_item=torch.from_numpy(item), seq_age=torch.from_numpy(age),
        user_vec=torch.from_numpy(np.zeros((1, rd.pf_item_vectors.shape[1]), np.float32) if vec is None
                                  else vec[None].astype(np.float32)),
        has_vector=torch.tensor([vec is not None]), hour=torch.tensor([(t % DAY) // 3600]),
        surface=torch.tensor([surface_code]), row_request=torch.zeros(len(items), dtype=torch.int64),
        cand_item=torch.from_numpy(items), labels=torch.zeros(len(items), len(rd.heads)),
        weight=torch.ones(len(items)), user=torch.tensor([u]))
    if len(model.inputs.feature_names):  # every event of the dataset before t (the log is exact at any time)
        q = Queries(np.full(len(items), u), items, np.full(len(items), t), np.zeros(len(items)))
        batch.features = torch.from_numpy(feature_table(rank_event_log(rd, ds), q, model.feature_config).values)
    spec = v2_spec_for(model, rd, ds.manifest.action_names(), ds.manifest.positive_codes)
    if spec is not None:
        batch.streams = spec.tensors(seq, np.array([0]), np.array([len(known)]))
    with torch.no_grad():
        probs = torch.sigmoid(model(batch, shared_projection=True)).numpy()
    titles = ds.items["text"].to_list() if "text" in ds.items.columns else [None] * ds.manifest.n_items
    out = pl.DataFrame({"item_id": [str(i) for i in item_ids], "title": [titles[i] for i in items],
                        **{h.name: probs[:, j] for j, h in enumerate(rd.heads)},
                        "utility": utility(probs, rd.heads)})
    return out.sort("utility", descending=True)
