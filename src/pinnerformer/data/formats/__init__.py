"""Source formats. Each reader returns a `RawLog`; `read_source` picks one by name."""

from __future__ import annotations

from pathlib import Path

from pinnerformer.data.formats.base import (
    DEFAULT_RATING_POSITIVE, DEFAULT_RATING_RULE, RatingRule, RawLog, parse_list,
)
from pinnerformer.data.formats.events import EventColumns, ItemColumns, read_events
from pinnerformer.data.formats.movielens import read_movielens, read_movielens_latest
from pinnerformer.data.formats.otto import read_otto
from pinnerformer.data.formats.sequences import read_sequences
from pinnerformer.errors import InputError

FORMATS = ["movielens", "movielens-latest", "sequences", "otto", "events"]


def read_source(fmt: str, path: Path, *, skip_invalid: bool = False, rating_rule: str | None = None,
                positive: str | None = None, actions: str | None = None, event_columns: EventColumns | None = None,
                time_format: str = "unix", separator: str = ",", id_type: str = "auto",
                items_path: Path | None = None, item_columns: ItemColumns | None = None,
                item_attributes: Path | None = None) -> RawLog:
    path = Path(path)
    if fmt in ("movielens", "movielens-latest"):
        rule = RatingRule.parse(rating_rule or DEFAULT_RATING_RULE)
        pos = parse_list(positive or DEFAULT_RATING_POSITIVE)
        if fmt == "movielens":
            return read_movielens(path, rule, pos, skip_invalid)
        return read_movielens_latest(path, rule, pos, skip_invalid)
    if fmt == "sequences":
        return read_sequences(path, skip_invalid, action=(parse_list(actions) or ["interact"])[0], id_type=id_type,
                              item_attributes=item_attributes)
    if fmt == "otto":
        return read_otto(path, parse_list(positive) or ["clicks", "carts", "orders"], skip_invalid)
    if fmt == "events":
        return read_events(path, event_columns or EventColumns(), time_format, parse_list(positive), skip_invalid,
                           actions=parse_list(actions) or None, separator=separator, id_type=id_type,
                           items_path=items_path, item_columns=item_columns)
    raise InputError(f"unknown format '{fmt}'", field="format", expected=" | ".join(FORMATS))
