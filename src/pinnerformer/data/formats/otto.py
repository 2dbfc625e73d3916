"""`otto`: OTTO e-commerce sessions, JSON lines `{"session": id, "events": [{"aid", "ts" (ms), "type"}]}`.

The session is the user; `type` (clicks / carts / orders) is the action. Timestamps are milliseconds:
duplicates are judged at that resolution, then times are stored in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pinnerformer.config import StrictModel
from pinnerformer.data.formats.base import Checker, RawLog, drop_blank_lines, read_lines, single_file
from pinnerformer.errors import InputError

OTTO_ACTIONS = ["clicks", "carts", "orders"]
EVENT_DTYPE = pl.Struct({"session": pl.Int64,
                         "events": pl.List(pl.Struct({"aid": pl.Int64, "ts": pl.Int64, "type": pl.String}))})


class OttoOptions(StrictModel):
    """Options of the `otto` format."""

    positive: list[str] = list(OTTO_ACTIONS)


EXPECTED = '{"session": <int>, "events": [{"aid": <int>, "ts": <int ms>, "type": "clicks"|"carts"|"orders"}, …]}'


def _locate_bad_json(lines: pl.DataFrame, file: Path) -> None:
    """Find the first line that is not a well-formed session (Polars' error does not name it)."""
    for line_no, raw in lines.select("_line", "raw").iter_rows():
        try:
            obj = json.loads(raw)
            ok = (isinstance(obj, dict) and isinstance(obj.get("session"), int) and isinstance(obj.get("events"), list)
                  and all(isinstance(e, dict) and isinstance(e.get("aid"), int) and isinstance(e.get("ts"), int)
                          and isinstance(e.get("type"), str) for e in obj["events"]))
            problem = "not an OTTO session record"
        except json.JSONDecodeError as e:
            ok, problem = False, f"malformed JSON ({e.msg} at column {e.colno})"
        if not ok:
            raise InputError(problem, path=file, line=line_no, text=raw, expected=EXPECTED)


def read_otto(path: Path, options: OttoOptions, skip_invalid: bool) -> RawLog:
    positive = options.positive
    file = single_file(path, ".jsonl", "an OTTO .jsonl file")
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    lines = drop_blank_lines(read_lines(file, checker=checker), skipped)
    try:
        decoded = lines.with_columns(pl.col("raw").str.json_decode(EVENT_DTYPE).alias("rec"))
    except pl.exceptions.ComputeError:
        _locate_bad_json(lines, file)
        raise
    decoded = decoded.with_columns(pl.lit(str(file)).alias("_file"))
    decoded = checker.check(decoded, pl.col("rec").struct.field("session").is_null(), reason="malformed_lines",
                            problem="record has no session id", field="session", expected=EXPECTED, text_col="raw")
    events = (decoded.select("_file", "_line", "raw", pl.col("rec").struct.field("session").alias("user"),
                             pl.col("rec").struct.field("events").alias("ev"))
              .explode("ev").filter(pl.col("ev").is_not_null()).unnest("ev"))
    for col in ("aid", "ts", "type"):
        events = checker.check(events, pl.col(col).is_null(), reason=f"missing_{col}",
                               problem=f"event without '{col}'", field=col, expected=EXPECTED, text_col="raw")
    events = checker.check(events, ~pl.col("type").is_in(OTTO_ACTIONS), reason="unknown_action",
                           problem="unknown event type", field="type", expected=" / ".join(OTTO_ACTIONS))
    events = events.select(pl.col("user"), pl.col("aid").alias("item"), pl.col("type").alias("action"), "ts",
                           pl.lit(None, pl.String).alias("surface"), pl.lit(None, pl.Float64).alias("duration"),
                           pl.lit(None, pl.String).alias("detail"), "_file", "_line")
    items = pl.DataFrame({"item": events["item"].unique().sort()}).with_columns(
        pl.lit(None, pl.String).alias("text"), pl.lit([], pl.List(pl.String)).alias("interests"))
    return RawLog(events=events, ts_unit="ms", actions=OTTO_ACTIONS, positive=positive, items=items,
                  sources=[file], skipped=skipped)
