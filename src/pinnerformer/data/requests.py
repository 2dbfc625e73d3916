"""Ranking requests from a prepared dataset, and the ranking data directory.

A request is what a user was shown together. Public logs rarely record that, so it is rebuilt from what exists:
the items a user acted on in one visit (`day`: one UTC day; `session`: split at an inactivity gap; `within-session`:
the session's second half, scored at its middle action, so that its first half is the realtime signal) are its
candidates, or, where the source logged requests (MIND's impression id, kept as each event's `detail`), exactly the
logged request (`logged`). A candidate's labels are its heads: named groups of action types, each positive or
negative (`save=love; like=love,like; hide=-dislike`). A candidate with no head's action (a Taobao page view
alone, a MIND impression not clicked, a 3-star rating) is an impression that was not engaged with.

No leakage, by construction: a request's realtime sequence is the user's actions strictly before the request's
first action (`seq_end`, an index into the dataset's timelines), and its PinnerFormer vector is the one of the
snapshot of the day before (computed from the actions before the request's UTC day: `snapshot_end`).

Time split: requests are ordered by time and cut at UTC midnights so that roughly the given fractions of them fall
in train / validation / test, or after the given last days of train and validation (`data.request_split`; the
papers: two weeks of training, the following week for evaluation). A model is
selected on validation and measured on test: each needs at least `MIN_PERIOD_REQUESTS` requests, and validation a
request with an engaged candidate of every head (`check_periods`), or its metrics are undefined. The first
`feature_share` of the training period (default half) is the feature period: the PinnerFormer behind the feature is
trained on it and the ranker is not. A PinnerFormer trained on the ranker's own training requests would score their
engaged items from having learned them (on the Taobao sample its score's grouped AUC was 0.65 on such requests and
0.50 on the test period), and the ranker would learn to trust a feature that is worth less at serving time; in
production the model behind yesterday's snapshot has likewise never seen today's requests. Only requests of the
feature and training periods larger than `max_candidates` are thinned (to a seeded sample): validation and test
requests keep every candidate, as a served request would.

The ranking data directory (written by `pinnerformer rank prepare`, read here):

    manifest.json            RankManifest (written last)
    requests.parquet         request, user, t, split, seq_end, snapshot_end, hour, surface, has_vector, source_id
    candidates.parquet       request, item, y_<head>... (0/1), sorted by request
    user_vectors.npy         [requests, D] float32: the PinnerFormer user vector of the day before (0 when none)
    pinnerformer_items.npy   [items, D] float32: the PinnerFormer item vectors (the score's other half)
    item_vectors.npy         [items, E] float32: the frozen item vectors of sequences and candidates
    item_vectors_int8.npy    [items, W] int8: the same vectors as TransAct V2's table (narrowed to W = int8_dim by
                             a fixed orthonormal projection where wider), x ≈ scale · (q - zero); scale, zero point,
                             the float range and the file's sha256 in the manifest (`int8_table`); memory-mapped
    pinnerformer/            the PinnerFormer run behind the feature (trained on the training period only)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from pinnerformer.config import StrictModel
from pinnerformer.data import request_split as rs
from pinnerformer.data.clock import DAY, utc_day
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import InputError, PinnerformerError
from pinnerformer.io import read_json_record

RANK_MANIFEST, REQUESTS, CANDIDATES = "manifest.json", "requests.parquet", "candidates.parquet"
USER_VECTORS, PF_ITEMS, ITEM_VECTORS, ITEM_INT8, PF_RUN = (
    "user_vectors.npy", "pinnerformer_items.npy", "item_vectors.npy", "item_vectors_int8.npy", "pinnerformer")
SPLIT_NAMES = ["train", "validation", "test", "feature"]  # codes 0..3; "feature": only the PinnerFormer learns from it
THINNED = ["feature", "train"]  # the periods whose requests are cut to max_candidates (validation and test: whole)

# the papers' heads on the data we have (format -> heads text)
DEFAULT_HEADS = {
    "movielens": "save=love; like=love,like; hide=-dislike",
    "movielens-latest": "save=love; like=love,like; hide=-dislike",
    "taobao": "cart=cart; fav=fav; buy=buy",
    "mind": "click=click",
}
# formats whose events carry the request the source logged them in (as `detail`): what --request logged reads
LOGGED_REQUEST_IDS = {"mind": "MIND's impression id"}
MIN_PERIOD_REQUESTS = 10  # validation and test: fewer cannot select a model, nor measure one


class Head(StrictModel):
    name: str
    actions: list[str]  # action type names; a candidate carries the head when any of its actions is one of them
    negative: bool = False  # a head such as hide: lower scores on its engaged items are better

    def text(self) -> str:
        return f"{self.name}={'-' if self.negative else ''}{','.join(self.actions)}"


def parse_heads(text: str, action_names: list[str], what: str = "--heads") -> list[Head]:
    """'save=love; like=love,like; hide=-dislike' -> heads; every action must be one of the dataset's."""
    heads: list[Head] = []
    for part in [p.strip() for p in text.replace("\n", ";").split(";") if p.strip()]:
        name, eq, acts = part.partition("=")
        name, acts = name.strip(), acts.strip()
        if not eq or not name or not acts.lstrip("-").strip():
            raise PinnerformerError(f"{what}: {part!r} is not a head (expected NAME=ACTION[,ACTION...], a leading "
                                    "'-' before the actions for a negative head, e.g. 'hide=-dislike')")
        negative = acts.startswith("-")
        actions = [a.strip() for a in acts.lstrip("-").split(",") if a.strip()]
        unknown = [a for a in actions if a not in action_names]
        if unknown:
            raise PinnerformerError(f"{what}: head '{name}' names unknown action(s) {', '.join(map(repr, unknown))} "
                                    f"(this dataset's actions: {', '.join(action_names)})")
        if any(h.name == name for h in heads):
            raise PinnerformerError(f"{what}: head '{name}' is given twice")
        heads.append(Head(name=name, actions=actions, negative=negative))
    if not heads:
        raise PinnerformerError(f"{what}: no head given (expected e.g. 'save=love; hide=-dislike')")
    return heads


def default_heads(fmt: str, action_names: list[str]) -> list[Head]:
    if fmt not in DEFAULT_HEADS:
        raise PinnerformerError(f"no default ranking heads for format '{fmt}' (defaults exist for "
                                f"{', '.join(DEFAULT_HEADS)}): give --heads, e.g. 'click=click; hide=-hide' "
                                f"(this dataset's actions: {', '.join(action_names)})")
    return parse_heads(DEFAULT_HEADS[fmt], action_names, f"default heads of format '{fmt}'")


class RequestOptions(StrictModel):
    request: Literal["day", "session", "within-session", "logged"] = "day"
    session_gap_minutes: float = Field(30.0, gt=0)
    heads: list[Head]
    split: tuple[float, float, float] | None = (0.7, 0.15, 0.15)  # fractions of the requests: train, validation, test
    split_dates: tuple[dt.date, dt.date] | None = None  # or the last UTC day of train and of validation (split: None)
    feature_share: float = Field(0.5, ge=0, lt=1)  # of the training period: the PinnerFormer's only (see above)
    min_candidates: int = Field(2, ge=2)  # a request with fewer has nothing to rank
    max_candidates: int = Field(100, ge=2)  # larger feature / training requests keep a seeded sample of this many
    item_vectors: Literal["auto", "content", "pinnerformer", "interests"] = "auto"  # frozen vectors: see rank prepare
    int8_dim: int = Field(64, ge=1)  # the width of TransAct V2's int8 item table
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "RequestOptions":
        # (PinnerformerError, not ValueError: pydantic would name no field, the message names the options)
        if self.min_candidates > self.max_candidates:
            raise PinnerformerError(f"--min-candidates {self.min_candidates} is above --max-candidates "
                                    f"{self.max_candidates} (min_candidates, max_candidates)")
        if self.split_dates is None:
            if self.split is None:
                raise PinnerformerError("no time split: give --split fractions or dates (split, split_dates)")
            return self
        if self.split is not None and "split" in self.model_fields_set:
            raise PinnerformerError("split and split_dates both given: --split takes fractions or dates, not both")
        rs.check_date_order(self.split_dates)
        self.split = None  # what was used, and only that, is what the manifest records
        return self

    @property
    def split_text(self) -> str:
        return rs.split_text(self.split, self.split_dates)


class SplitCounts(StrictModel):
    requests: int
    candidates: int
    first_day: str | None
    last_day: str | None
    requests_with: dict[str, int]  # per head: requests with at least one engaged candidate (HIT@3 counts these)
    engaged: dict[str, int]  # per head: engaged candidates
    without_vector: int = 0  # requests whose user had no action before the request's day (no snapshot vector)


class Int8TableInfo(StrictModel):
    """TransAct V2's int8 item table: x ≈ scale · (q - zero) with scale = (hi - lo) / 255 and
    zero = round(-128 - lo / scale), lo / hi the float range (widened to hold 0) of the projected vectors."""

    file: str = ITEM_INT8
    shape: tuple[int, int]
    source_dim: int  # the frozen vectors' width before the projection
    projection_seed: int  # of the fixed orthonormal projection (none when source_dim <= the table's width)
    scale: float
    zero: int
    lo: float
    hi: float
    sha256: str


class RankManifest(StrictModel):
    kind: Literal["ranking-data"] = "ranking-data"
    dataset: DatasetRef
    dataset_format: str
    options: RequestOptions
    train_end: int  # Unix s: train is [feature_end, train_end), validation [train_end, val_end), test [val_end, ..)
    val_end: int
    feature_end: int | None = None  # the feature period [.., feature_end): the PinnerFormer's, not the ranker's
    splits: dict[str, SplitCounts]
    skipped: dict[str, int]  # requests (or candidates) not kept, by reason
    pinnerformer: dict[str, object]  # the run behind the feature: path, checkpoint_sha256, trained_until, dim
    item_vectors: dict[str, object]  # source ("content" | "pinnerformer" | "interests"), dim, requested, why
    # the periods whose requests were cut to options.max_candidates (all four in data prepared before this field)
    thinned_periods: list[str] = ["feature", "train", "validation", "test"]
    int8_table: Int8TableInfo | None = None  # absent in ranking data prepared before TransAct V2
    fingerprint: str  # of the request and candidate tables
    created_at: str
    notes: list[str] = []

    @property
    def head_names(self) -> list[str]:
        return [h.name for h in self.options.heads]

    @property
    def pf_until(self) -> int:
        """What the PinnerFormer behind the feature may have seen: events before this time."""
        return self.feature_end if self.feature_end is not None else self.train_end


@dataclass
class RequestTables:
    requests: pl.DataFrame
    candidates: pl.DataFrame
    train_end: int
    val_end: int
    feature_end: int | None
    skipped: dict[str, int]

    @property
    def pf_until(self) -> int:
        return self.feature_end if self.feature_end is not None else self.train_end


def check_requestable(ds: Dataset, request: str) -> None:
    """Data that cannot give requests of this kind, refused before anything else is asked for: order-only data, and
    --request logged on data whose source logged no request ids."""
    m = ds.manifest
    if m.clock != "seconds":
        raise PinnerformerError(f"{ds.path}: the dataset has no timestamps (order-only clock): ranking requests, "
                                "the realtime sequence before each request and TransAct's time-window mask need "
                                "real times")
    if request == "logged" and m.format not in LOGGED_REQUEST_IDS:
        raise PinnerformerError(
            f"--request logged: {ds.path} is a {m.format} dataset, whose events carry no request id (logged requests "
            f"are kept for {', '.join(f'{f} ({what})' for f, what in LOGGED_REQUEST_IDS.items())} only): its requests "
            "must be rebuilt, use --request day or --request session")


def check_periods(counts: dict[str, SplitCounts], heads: list[Head], where: Path) -> None:
    """Validation and test large enough to select a model on and to measure it: at least MIN_PERIOD_REQUESTS
    requests each, and in validation a request with an engaged candidate of every head (HIT@k and AUC are
    undefined without one)."""
    problems = [f"the {name} period holds {counts[name].requests} request(s)" for name in ("validation", "test")
                if counts[name].requests < MIN_PERIOD_REQUESTS]
    missing = [h.name for h in heads if not counts["validation"].requests_with.get(h.name)]
    if missing:
        problems.append(f"the validation period has no request with an engaged candidate of head {', '.join(missing)}")
    if problems:
        raise PinnerformerError(
            f"{where}: {'; '.join(problems)}: selecting a model on validation and measuring it on test need at least "
            f"{MIN_PERIOD_REQUESTS} requests in each, and in validation a request engaged with on every head; prepare "
            "the ranking data with another --split (a larger validation or test share, or later dates), or from more "
            "days")


def build_requests(ds: Dataset, opts: RequestOptions, log=print) -> RequestTables:
    """Requests, their candidates and labels, their sequence and snapshot bounds, and the time split."""
    m = ds.manifest
    check_requestable(ds, opts.request)
    names = m.action_names()
    head_codes = [[names.index(a) for a in h.actions] for h in opts.heads]
    tl = ds.timelines
    ev = pl.DataFrame({"user": tl.user_of_event(), "item": np.asarray(tl.item), "action": np.asarray(tl.action),
                       "ts": np.asarray(tl.ts), "surface": np.asarray(tl.surface)}).with_row_index("pos")
    skipped: dict[str, int] = {}
    if opts.request == "logged":
        detail = ds.events(columns=["detail"])["detail"]
        if detail.null_count() == len(detail):
            raise PinnerformerError(f"{ds.path}: --request logged needs the source's request ids (kept as each "
                                    "event's detail, e.g. MIND's impression id); this dataset has none: use "
                                    "--request day or session")
        ev = ev.with_columns(detail.alias("key")).filter(pl.col("key").is_not_null())
    else:
        ev = rs.visit_keys(ev, opts.request, int(opts.session_gap_minutes * 60))
    labels = [pl.col("action").is_in(codes).any().cast(pl.UInt8).alias(f"y_{h.name}")
              for h, codes in zip(opts.heads, head_codes)]
    cand = (ev.group_by("user", "key", "item", maintain_order=True)
            .agg(pl.col("ts").min().alias("t_item"), pl.col("pos").min().alias("first_pos"), *labels))
    # the surface is the first action's: what is known when the request starts (later ones may be its engagements)
    req = (ev.group_by("user", "key", maintain_order=True)
           .agg(pl.col("ts").min().alias("t"), pl.col("ts").max().alias("t_last"),
                pl.col("surface").sort_by("pos").first().alias("surface"), pl.col("item").n_unique().alias("n")))
    few = req.filter(pl.col("n") < opts.min_candidates)
    if few.height:
        skipped[f"requests_with_fewer_than_{opts.min_candidates}_candidates"] = few.height
    req = req.filter(pl.col("n") >= opts.min_candidates)
    if req.height == 0:
        raise PinnerformerError(f"{ds.path}: no {opts.request} request has at least {opts.min_candidates} candidates "
                                f"(distinct items): nothing to rank (try --request day, or a dataset with visits)")
    t_first, t_last = req["t"].to_numpy(), req["t_last"].to_numpy()
    train_end, val_end = (rs.date_bounds(t_first, opts.split_dates) if opts.split_dates is not None
                          else rs.fraction_bounds(t_first, opts.split))
    feature_end = (rs.feature_bound(t_first[t_first < train_end], opts.feature_share) if opts.feature_share > 0
                   else None)
    # a session that runs past a cut-off would carry labels from the next period into its own: dropped, counted
    across = np.zeros(req.height, bool)
    for bound in (feature_end, train_end, val_end):
        if bound is not None:
            across |= (t_first < bound) & (t_last >= bound)
    if across.any():
        skipped["requests_across_a_split_boundary"] = int(across.sum())
        req = req.filter(pl.Series(~across))
    req = req.sort("t", "user", "key").with_row_index("request")
    split = rs.period_codes(req["t"].to_numpy(), train_end, val_end, feature_end)
    req = req.with_columns(pl.Series("split", split))
    cand = cand.join(req.select("user", "key", "request", "t", "split"), on=["user", "key"], how="inner")
    # larger feature / training requests: a seeded uniform sample of max_candidates (the same on every machine);
    # validation and test requests are measured whole, as served
    rng = np.random.default_rng(opts.seed)
    cand = cand.sort("request", "first_pos").with_columns(pl.Series("r", rng.random(cand.height)))
    over = cand.with_columns(pl.col("r").rank("ordinal").over("request").alias("rk"))
    beyond = (pl.col("rk") > opts.max_candidates) & pl.col("split").is_in([SPLIT_NAMES.index(p) for p in THINNED])
    dropped = int(over.select(beyond.sum()).item())
    if dropped:
        skipped[f"candidates_beyond_{opts.max_candidates}_per_request"] = dropped
    cand = over.filter(~beyond).sort("request", "first_pos")
    # sequence and snapshot bounds: the first event of the user at or after the request / its day
    starts = np.asarray(tl.offsets[:-1])
    users, t = req["user"].to_numpy(), req["t"].to_numpy()
    day_start = (t // DAY) * DAY
    seq_end = np.empty(len(req), np.int64)
    snap_end = np.empty(len(req), np.int64)
    for i, (u, ti, di) in enumerate(zip(users, t, day_start)):
        a, b = int(starts[u]), int(tl.offsets[u + 1])
        ts = np.asarray(tl.ts[a:b])
        seq_end[i] = a + int(np.searchsorted(ts, ti, side="left"))
        snap_end[i] = a + int(np.searchsorted(ts, di, side="left"))
    empty = [SPLIT_NAMES[c] for c in (0, 1, 2) if not (split == c).any()]
    if empty:
        raise PinnerformerError(f"the {' and '.join(empty)} period(s) hold no request once the "
                                f"{skipped.get('requests_across_a_split_boundary', 0)} requests that run across a cut-off "
                                f"are left out (requests are cut at UTC midnights; --split {opts.split_text}): use "
                                "--request day, or other --split fractions or dates")
    requests = pl.DataFrame({
        "request": req["request"].cast(pl.Int64), "user": req["user"].cast(pl.Int32), "t": req["t"].cast(pl.Int64),
        "split": split, "seq_end": seq_end, "snapshot_end": snap_end,
        "hour": ((t % DAY) // 3600).astype(np.int8), "surface": req["surface"].cast(pl.Int16),
        "source_id": req["key"] if opts.request == "logged" else pl.Series([None] * len(req), dtype=pl.String)})
    candidates = cand.select(pl.col("request").cast(pl.Int64), pl.col("item").cast(pl.Int32),
                             *[pl.col(f"y_{h.name}") for h in opts.heads])
    n_cand = candidates.group_by("request").len().sort("request")["len"].to_numpy()
    if (n_cand < opts.min_candidates).any():  # cannot happen after the filter; a bug guard, not an input check
        raise AssertionError("a request lost its candidates")
    return RequestTables(requests, candidates, int(train_end), int(val_end), feature_end, skipped)


def split_counts(requests: pl.DataFrame, candidates: pl.DataFrame, heads: list[Head]) -> dict[str, SplitCounts]:
    out = {}
    for code, name in enumerate(SPLIT_NAMES):
        r = requests.filter(pl.col("split") == code)
        if name == "feature" and r.height == 0:
            continue
        c = candidates.join(r.select("request"), on="request", how="semi")
        per_req = c.group_by("request").agg(*[pl.col(f"y_{h.name}").max() for h in heads])
        day = lambda x: None if x is None else utc_day(int(x)).isoformat()  # noqa: E731
        out[name] = SplitCounts(
            requests=r.height, candidates=c.height, first_day=day(r["t"].min()), last_day=day(r["t"].max()),
            requests_with={h.name: int(per_req[f"y_{h.name}"].sum() or 0) for h in heads},
            engaged={h.name: int(c[f"y_{h.name}"].sum() or 0) for h in heads},
            without_vector=int((~r["has_vector"]).sum()) if "has_vector" in r.columns else 0)
    return out


class RankData:
    """A ranking data directory, opened (tables in memory as numpy arrays; vectors memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / RANK_MANIFEST
        if not self.path.is_dir():
            raise InputError("ranking data directory does not exist", path=self.path,
                             expected="a directory written by `pinnerformer rank prepare`")
        if not mpath.exists():
            raise InputError("no manifest.json: not ranking data, or its preparation did not finish", path=self.path,
                             expected="a directory written by `pinnerformer rank prepare`")
        raw = read_json_record(mpath, "ranking data manifest", "run `pinnerformer rank prepare` again")
        if raw.get("kind") != "ranking-data":
            what = "a prepared dataset" if "n_events" in raw else "something else"
            raise InputError(f"not ranking data: this is {what}", path=self.path,
                             expected="a directory written by `pinnerformer rank prepare --dataset DATASET --output "
                             "RANK_DIR`")
        try:
            self.manifest = RankManifest.model_validate(raw)
        except ValueError as e:
            raise PinnerformerError(f"{mpath}: not a ranking manifest this version can read: {e}") from None
        req = pl.read_parquet(self.path / REQUESTS)
        cand = pl.read_parquet(self.path / CANDIDATES)
        self.request_user = req["user"].to_numpy()
        self.request_t = req["t"].to_numpy()
        self.split = req["split"].to_numpy()
        self.seq_end = req["seq_end"].to_numpy()
        self.snapshot_end = req["snapshot_end"].to_numpy()
        self.hour = req["hour"].to_numpy().astype(np.int64)
        self.surface = req["surface"].to_numpy().astype(np.int64)
        self.has_vector = req["has_vector"].to_numpy()
        self.source_id = req["source_id"]
        self.cand_request = cand["request"].to_numpy()
        self.cand_item = cand["item"].to_numpy().astype(np.int64)
        self.labels = np.stack([cand[f"y_{h}"].to_numpy() for h in self.manifest.head_names], 1).astype(np.float32)
        # request r owns candidates cand_start[r] : cand_start[r + 1] (candidates are sorted by request)
        self.cand_start = np.searchsorted(self.cand_request, np.arange(len(req) + 1))

    @property
    def heads(self) -> list[Head]:
        return self.manifest.options.heads

    @property
    def n_requests(self) -> int:
        return len(self.request_t)

    def candidate_rows(self, requests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidate rows of `requests`, concatenated in request order, and where each request's begin
        (starts [len(requests) + 1])."""
        requests = np.asarray(requests, dtype=np.int64)
        sizes = self.cand_start[requests + 1] - self.cand_start[requests]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows = np.repeat(self.cand_start[requests] - starts[:-1], sizes) + np.arange(starts[-1])
        return rows.astype(np.int64), starts

    def requests_in(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split))

    @cached_property
    def user_vectors(self) -> np.ndarray:
        return np.load(self.path / USER_VECTORS, mmap_mode="r")

    @cached_property
    def pf_item_vectors(self) -> np.ndarray:
        return np.load(self.path / PF_ITEMS)

    @cached_property
    def item_vectors(self) -> np.ndarray:
        return np.load(self.path / ITEM_VECTORS)

    def dataset(self, descendants: bool = False) -> Dataset:
        """The dataset the requests index into: the same fingerprint, or a clear error; with `descendants`, also one
        grown from it by appends (ids keep their codes: what serving reads)."""
        ref = self.manifest.dataset
        if not Path(ref.path).is_dir():
            raise PinnerformerError(f"{self.path} was built from the dataset {ref.path}, which no longer exists")
        ds = Dataset.open(ref.path)
        if descendants and ds.manifest.descends_from(ref.fingerprint):
            return ds
        if ds.manifest.fingerprint != ref.fingerprint:
            raise PinnerformerError(f"{self.path} was built from dataset {ref.path} with fingerprint "
                                    f"{ref.fingerprint}; it now has {ds.manifest.fingerprint} (prepare the ranking "
                                    "data again)")
        return ds
