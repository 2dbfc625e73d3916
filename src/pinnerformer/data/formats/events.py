"""`events`: any CSV or Parquet event log, with its columns named by options.

Required: user, item and time columns. Optional: action (else every event is `interact`), surface, duration
(seconds). Time formats: `unix` (seconds, may be fractional), `unix-ms`, `iso` (ISO-8601; naive times are
UTC), `order` (no clock: the file order within each user is the time order), or a strftime pattern such as
`%Y-%m-%d %H:%M:%S`. Ids that are all integers are kept as integers, otherwise as strings.
An optional item table (CSV or Parquet) gives item text and interests (`|`-separated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from pinnerformer.config import StrictModel
from pinnerformer.data.formats.base import Checker, RawLog, TimeUnit, read_csv_records
from pinnerformer.errors import InputError


class EventColumns(StrictModel):
    user: str = "user"
    item: str = "item"
    time: str = "timestamp"
    action: str | None = None
    surface: str | None = None
    duration: str | None = None


class ItemColumns(StrictModel):
    item: str = "item"
    text: str | None = None
    interests: str | None = None
    interests_separator: str = "|"


class EventsOptions(StrictModel):
    """Options of the `events` format."""

    columns: EventColumns = EventColumns()
    time_format: str = "unix"  # unix | unix-ms | iso | order | a strftime pattern
    positive: list[str] = []  # default: the single action, when there is no action column
    actions: list[str] | None = None  # the allowed action values (others are errors); default: those found
    separator: str = ","
    id_type: Literal["auto", "int", "str"] = "auto"
    items: Path | None = None  # item table (CSV or Parquet)
    item_columns: ItemColumns = ItemColumns()


def _read_table(path: Path, columns: list[str], checker: Checker, separator: str, required: list[str]) -> pl.DataFrame:
    """CSV or Parquet -> String columns + _file/_line; a missing column is named with what was found."""
    if not path.exists():
        raise InputError("file not found", path=path)
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            df = pl.read_parquet(path)
        except Exception as e:  # pyarrow/polars raise several types for a corrupt file
            raise InputError(f"cannot read as Parquet: {e}", path=path) from None
        checker.line_label = "row"
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise InputError(f"missing column(s) {', '.join(missing)}", path=path, text=", ".join(df.columns),
                             expected=f"columns {', '.join(columns)}")
        nested = [c for c in columns if df.schema[c].is_nested()]
        if nested:
            c = nested[0]
            raise InputError(f"column '{c}' holds {df.schema[c]} values", path=path, field=c,
                             expected="one value per row (an id, a time, an action name or a number)")
        df = df.select(columns).with_columns(pl.lit(str(path)).alias("_file"),
                                             pl.int_range(1, df.height + 1, dtype=pl.Int64).alias("_line"))
        for col in required:
            df = checker.check(df, pl.col(col).is_null(), reason=f"missing_{col}", problem="missing value",
                               field=col, expected=f"'{col}' filled")
        return df
    df = read_csv_records(path, None, checker, separator=separator)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}", path=path, line=1,
                         text=separator.join(c for c in df.columns if c not in ("_file", "_line")),
                         expected=f"a header with {', '.join(columns)} (set the column names with --*-col options)")
    df = df.select(*columns, "_file", "_line")
    for col in required:
        df = checker.check(df, pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""),
                           reason=f"missing_{col}", problem="missing value", field=col, expected=f"'{col}' filled")
    return df


def _ids(df: pl.DataFrame, col: str, id_type: str, checker: Checker) -> pl.DataFrame:
    """Ids as Int64 when they are all whole numbers (auto; `1` and `1.0`, as a float column writes it, are one id),
    else as strings."""
    if df.schema[col].is_integer():
        return df.with_columns(pl.col(col).cast(pl.Int64))
    s = pl.col(col).cast(pl.String).str.strip_chars()
    if id_type == "str":
        return df.with_columns(s.alias(col))
    as_num = s.cast(pl.Float64, strict=False)
    whole = as_num.is_finite() & (as_num == as_num.round()) & (as_num.abs() < 2.0 ** 53)
    as_int = pl.when(whole).then(as_num).otherwise(None).cast(pl.Int64)
    if id_type == "auto":
        all_int = df.select((as_int.is_null() == pl.col(col).is_null()).all()).item()
        return df.with_columns((as_int if all_int else s).alias(col))
    df = checker.check(df, as_int.is_null(), reason=f"non_integer_{col}", problem="id is not an integer",
                       field=col, expected="integer ids (--id-type int)")
    return df.with_columns(as_int.alias(col))


ISO_TZ = ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z"]
ISO_NAIVE = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"]


def _time(df: pl.DataFrame, col: str, time_format: str, checker: Checker) -> tuple[pl.DataFrame, TimeUnit]:
    """Parse the time column into Int64 `ts` in milliseconds (or positions for `order`)."""
    dtype = df.schema[col]
    if time_format == "order":
        return df.with_columns(pl.int_range(pl.len()).over("user").cast(pl.Int64).alias("ts")), "order"
    if isinstance(dtype, pl.Datetime):
        return df.with_columns(pl.col(col).dt.epoch("ms").alias("ts")), "ms"
    raw = pl.col(col).cast(pl.String).str.strip_chars()
    if time_format in ("unix", "unix-ms"):
        parsed = raw.cast(pl.Float64, strict=False)
        ms = parsed * 1000 if time_format == "unix" else parsed
        expected = "a Unix timestamp in " + ("seconds" if time_format == "unix" else "milliseconds")
        ok = parsed.is_not_null() & parsed.is_finite() & (ms.abs() < 4e18)  # beyond: no int64 milliseconds
        df = checker.check(df, ~ok, reason="unparseable_time", problem="timestamp is not parseable", field=col,
                           expected=expected)
        return df.with_columns(ms.round().cast(pl.Int64).alias("ts")), "ms"
    if time_format == "iso":
        # each row in its own form: with an offset or Z (converted to UTC) or naive (taken as UTC), with or without
        # seconds, fractions and the time; one inferred format for the whole column would reject the others
        with_tz = raw.str.replace(r"Z$", "+00:00")
        parsed = pl.coalesce(
            [with_tz.str.to_datetime(format=f, strict=False, time_unit="ms").dt.epoch("ms") for f in ISO_TZ]
            + [raw.str.to_datetime(format=f, strict=False, time_unit="ms").dt.epoch("ms") for f in ISO_NAIVE])
        expected = "an ISO-8601 time such as 2020-01-31T12:00:00, 2020-01-31T12:00:00Z or 2020-01-31T14:00:00+02:00"
        df = checker.check(df, parsed.is_null(), reason="unparseable_time", problem="timestamp is not parseable",
                           field=col, expected=expected)
        return df.with_columns(parsed.alias("ts")), "ms"
    parsed = raw.str.to_datetime(format=time_format, strict=False, time_unit="ms")
    expected = f"a time in the format {time_format!r}"
    df = checker.check(df, parsed.is_null(), reason="unparseable_time", problem="timestamp is not parseable",
                       field=col, expected=expected)
    return df.with_columns(parsed.dt.epoch("ms").alias("ts")), "ms"


def read_events(path: Path, options: EventsOptions, skip_invalid: bool) -> RawLog:
    cols, time_format, positive, actions = options.columns, options.time_format, list(options.positive), options.actions
    separator, id_type, items_path, ic = options.separator, options.id_type, options.items, options.item_columns
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    wanted = [c for c in (cols.user, cols.item, cols.time, cols.action, cols.surface, cols.duration) if c]
    if len(set(wanted)) != len(wanted):
        raise InputError("the same column is mapped to two fields", field="columns", text=", ".join(wanted))
    df = _read_table(path, wanted, checker, separator, required=[c for c in (cols.user, cols.item, cols.time, cols.action) if c])
    df = df.rename({cols.user: "user", cols.item: "item"})
    df = _ids(df, "user", id_type, checker)
    df = _ids(df, "item", id_type, checker)
    df, unit = _time(df, cols.time, time_format, checker)

    if cols.action:
        df = df.with_columns(pl.col(cols.action).cast(pl.String).str.strip_chars().alias("action"))
        seen = sorted(df["action"].unique().drop_nulls().to_list())
        if actions is None:
            actions = seen
        else:
            df = checker.check(df, ~pl.col("action").is_in(actions), reason="unknown_action",
                               problem="unknown action value", field=cols.action,
                               expected=f"one of {', '.join(actions)} (--actions)")
        if not positive:
            raise InputError("no positive actions given", field="positive",
                             expected=f"--positive with some of: {', '.join(actions)}")
    else:
        actions = actions or ["interact"]
        if len(actions) != 1:
            raise InputError("--actions lists several actions but no --action-col says which event has which",
                             field="actions")
        df = df.with_columns(pl.lit(actions[0]).alias("action"))
        positive = positive or actions
    unknown_pos = [p for p in positive if p not in actions]
    if unknown_pos:
        raise InputError(f"positive action(s) {', '.join(unknown_pos)} never occur in the input", field="positive",
                         expected=f"some of: {', '.join(actions)}")

    surface = (pl.col(cols.surface).cast(pl.String).str.strip_chars() if cols.surface else pl.lit(None, pl.String))
    if cols.duration:
        dur = pl.col(cols.duration).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
        given = pl.col(cols.duration).is_not_null() & (pl.col(cols.duration).cast(pl.String).str.strip_chars() != "")
        df = checker.check(df, given & (dur.is_null() | (dur < 0) | ~dur.is_finite()), reason="bad_duration",
                           problem="duration is not a non-negative number", field=cols.duration,
                           expected="seconds >= 0, or empty when unknown")
    else:
        dur = pl.lit(None, pl.Float64)
    events = df.select("user", "item", "action", "ts", surface.alias("surface"), dur.alias("duration"),
                       pl.lit(None, pl.String).alias("detail"), "_file", "_line")

    sources = [path]
    item_ids = events["item"].unique().sort()
    if items_path is not None:
        icols = [c for c in (ic.item, ic.text, ic.interests) if c]
        ichecker = Checker(skip_invalid, skipped)
        it = _read_table(items_path, icols, ichecker, separator, required=[ic.item]).rename({ic.item: "item"})
        it = it.with_columns(pl.col("item").cast(item_ids.dtype, strict=False).alias("_id"))
        it = ichecker.check(it, pl.col("_id").is_null(), reason="item_table_bad_id", field="item",
                            problem="item id does not match the events' id type", expected=f"{item_ids.dtype} ids")
        items = it.select(pl.col("_id").alias("item"),
                          (pl.col(ic.text).cast(pl.String) if ic.text else pl.lit(None, pl.String)).alias("text"),
                          (pl.col(ic.interests).cast(pl.String).str.split(ic.interests_separator)
                           .list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
                           if ic.interests else pl.lit([], pl.List(pl.String))).alias("interests"))
        dup = items["item"].is_duplicated()
        if dup.any():
            raise InputError(f"item id {items.filter(dup)['item'][0]} appears more than once", path=items_path,
                             expected="one row per item")
        sources.append(items_path)
    else:
        items = pl.DataFrame({"item": item_ids}).with_columns(
            pl.lit(None, pl.String).alias("text"), pl.lit([], pl.List(pl.String)).alias("interests"))
    notes = ["time format 'order': file order within each user is the time order, no real clock"] if unit == "order" else []
    return RawLog(events=events, ts_unit=unit, actions=list(actions), positive=list(positive), items=items,
                  sources=sources, line_label=checker.line_label, skipped=skipped, notes=notes,
                  options={"columns": cols.model_dump(), "time_format": time_format, "separator": separator})
