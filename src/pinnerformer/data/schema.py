"""The canonical dataset directory: file names, column types and the manifest.

A prepared dataset is a directory:

    manifest.json        this module's `Manifest` (written last; its presence marks a complete dataset)
    events.parquet       one row per event, sorted by user then time (ties keep input order)
                         user:int32  item:int32  action:int16  ts:int64  surface:int16?  duration:float32?
                         detail:str?   (source payload that distinguishes otherwise equal events,
                                        e.g. the raw rating "4.5" or the tag text)
    users.parquet        user:int32 (dense index)  user_id (the id in the source)
    items.parquet        item:int32  item_id  text:str?  interests:list[str]  [content_vector:list[float32]]
    timelines/*.npy      the same events as flat numpy arrays + per-user offsets (memory-mappable),
                         see `pinnerformer.data.timelines`

`ts` is seconds since the Unix epoch when `clock == "seconds"`, and the position of the event in the
user's sequence when `clock == "order"` (formats with no real clock). Never mix the two.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pinnerformer.config import StrictModel
from pinnerformer.errors import InputError, PinnerformerError
from pinnerformer.io import read_json_record

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
EVENTS = "events.parquet"
USERS = "users.parquet"
ITEMS = "items.parquet"
TIMELINES = "timelines"

Clock = Literal["seconds", "order"]


class ActionType(StrictModel):
    code: int
    name: str
    positive: bool


class SourceFile(StrictModel):
    path: str
    bytes: int
    sha256: str


class DatasetRef(StrictModel):
    """Which prepared dataset something was made from."""

    path: str
    fingerprint: str


class ContentVectors(StrictModel):
    model: str
    dim: int
    l2_normalised: bool
    max_tokens: int
    items_without_text: int
    sha256: str


class AppendRecord(StrictModel):
    """One `pinnerformer data append`: what came in, on top of which dataset."""

    parent_fingerprint: str
    sources: list[SourceFile]
    time_min: int  # the appended events' time range
    time_max: int
    events: int  # events added (after duplicates were removed)
    new_users: int
    new_items: int
    late_events: int  # events older than the parent's end, kept with --allow-late
    duplicates_removed: int  # within the new events, or already in the dataset
    skipped: dict[str, int]
    appended_at: str


class Manifest(StrictModel):
    schema_version: int = SCHEMA_VERSION
    pinnerformer_version: str
    format: str
    clock: Clock
    n_events: int
    n_users: int
    n_items: int
    actions: list[ActionType]
    surfaces: list[str]
    events_per_action: dict[str, int]
    time_min: int
    time_max: int
    has_surface: bool
    has_duration: bool
    sources: list[SourceFile]
    options: dict[str, object]
    # What the input had that is not in the dataset, by reason (documented skips and deduplication).
    skipped: dict[str, int]
    duplicates_removed: int
    notes: list[str]
    fingerprint: str
    content_vectors: ContentVectors | None = None
    # Growing datasets: the fingerprints of the datasets this one was appended onto (oldest first), and each
    # append. User and item indexes never change on append, so a model trained on an ancestor still applies.
    ancestors: list[str] = []
    lineage: list[AppendRecord] = []

    def descends_from(self, fingerprint: str) -> bool:
        """This dataset is `fingerprint`, or was grown from it by appends."""
        return fingerprint == self.fingerprint or fingerprint in self.ancestors

    @property
    def positive_codes(self) -> list[int]:
        return [a.code for a in self.actions if a.positive]

    def action_names(self) -> list[str]:
        return [a.name for a in self.actions]

    def time_range_text(self) -> str:
        if self.clock == "order":
            return f"order only (positions {self.time_min}…{self.time_max}, no real clock)"
        f = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        return f"{f(self.time_min)} → {f(self.time_max)} UTC"


def read_manifest(dataset_dir: Path) -> Manifest:
    path = Path(dataset_dir) / MANIFEST
    if not Path(dataset_dir).is_dir():
        raise InputError("dataset directory does not exist", path=dataset_dir,
                         expected="a directory written by `pinnerformer data prepare`")
    if not path.exists():
        raise InputError("no manifest.json: not a prepared dataset, or its preparation did not finish",
                         path=dataset_dir, expected="a directory written by `pinnerformer data prepare`")
    raw = read_json_record(path, "dataset manifest", "prepare the dataset again")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"dataset schema version {raw.get('schema_version')} is not supported",
                         path=path, expected=f"schema_version {SCHEMA_VERSION}; prepare the dataset again")
    try:
        return Manifest.model_validate(raw)
    except ValueError as e:  # pydantic's ValidationError
        raise PinnerformerError(f"{path}: not a dataset manifest this version can read: {e}") from None
