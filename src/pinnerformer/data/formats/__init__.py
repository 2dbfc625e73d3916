"""Source formats. Each reader takes its own options class and returns a `RawLog`; `read_source` picks one by name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pinnerformer.config import StrictModel, validate
from pinnerformer.data.formats.base import RawLog
from pinnerformer.data.formats.events import EventColumns, EventsOptions, ItemColumns, read_events
from pinnerformer.data.formats.mind import MindOptions, read_mind
from pinnerformer.data.formats.movielens import MovieLensOptions, read_movielens, read_movielens_latest
from pinnerformer.data.formats.otto import OttoOptions, read_otto
from pinnerformer.data.formats.sequences import SequencesOptions, read_sequences
from pinnerformer.data.formats.taobao import TaobaoOptions, read_taobao
from pinnerformer.errors import InputError

# format name -> (its options class, its reader(path, options, skip_invalid))
FORMATS: dict[str, tuple[type[StrictModel], Callable[..., RawLog]]] = {
    "movielens": (MovieLensOptions, read_movielens),
    "movielens-latest": (MovieLensOptions, read_movielens_latest),
    "sequences": (SequencesOptions, read_sequences),
    "otto": (OttoOptions, read_otto),
    "events": (EventsOptions, read_events),
    "taobao": (TaobaoOptions, read_taobao),
    "mind": (MindOptions, read_mind),
}

__all__ = ["FORMATS", "EventColumns", "EventsOptions", "ItemColumns", "MindOptions", "MovieLensOptions", "OttoOptions",
           "RawLog", "SequencesOptions", "TaobaoOptions", "options_for", "read_source"]


def options_for(fmt: str, raw: dict | None = None) -> StrictModel:
    """The options of format `fmt` from a dict (unknown keys are errors that name the format)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'", field="format", expected=" | ".join(FORMATS))
    return validate(FORMATS[fmt][0], raw or {}, f"options of format '{fmt}'")


def read_source(fmt: str, path: Path, options: StrictModel | dict | None = None, skip_invalid: bool = False) -> RawLog:
    if not isinstance(options, StrictModel):
        options = options_for(fmt, options)
    elif fmt in FORMATS and not isinstance(options, FORMATS[fmt][0]):
        raise TypeError(f"format {fmt} takes {FORMATS[fmt][0].__name__}, not {type(options).__name__}")
    return FORMATS[fmt][1](Path(path), options, skip_invalid)
