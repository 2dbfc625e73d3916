"""`sequences`: one line per user, `user i1 i2 …`, items in time order, no timestamps (e.g. Amazon Beauty).

The dataset gets clock = "order": `ts` is the position in the user's sequence. Every event gets one action
type (default `interact`, positive). Item attributes (`NAME_item2attributes.json` beside `NAME.txt`, item id ->
list of attribute ids) become item interests when present beside the file or given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from typing import Literal

from pinnerformer.config import StrictModel
from pinnerformer.data.formats.base import Checker, RawLog, drop_blank_lines, read_lines, single_file
from pinnerformer.errors import InputError


class SequencesOptions(StrictModel):
    """Options of the `sequences` format."""

    action: str = "interact"  # the one action type every event gets (positive)
    id_type: Literal["auto", "int", "str"] = "auto"
    item_attributes: Path | None = None  # default: beside the input (`attributes_beside`)


def attributes_beside(file: Path) -> Path | None:
    """The item attributes of `file`: FILE-STEM_item2attributes.json beside it (the stem's case aside), else a plain
    item2attributes.json there, else none. Attribute files named for other files only (a folder of several datasets,
    as the published sequential-recommendation code ships them) are an error: taking none would drop the attributes
    unsaid, taking another dataset's would attach wrong ones (item ids overlap)."""
    found = sorted(file.parent.glob("*item2attributes.json"))
    for name in (f"{file.stem}_item2attributes.json", "item2attributes.json"):  # its own first, then a plain one
        own = [f for f in found if f.name.lower() == name.lower()]
        if own:
            return own[0]
    if found:
        raise InputError(f"{len(found)} item attribute file(s) beside the sequences ("
                         + ", ".join(f.name for f in found[:4]) + (", …" if len(found) > 4 else "")
                         + f"), none named {file.stem}_item2attributes.json", path=file,
                         expected="--item-attributes naming the one that belongs to this file (or none: rename it)")
    return None


def read_sequences(path: Path, options: SequencesOptions, skip_invalid: bool) -> RawLog:
    action, id_type, item_attributes = options.action, options.id_type, options.item_attributes
    file = single_file(path, ".txt", "a sequences file")
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    lines = drop_blank_lines(read_lines(file, checker=checker), skipped)
    lines = lines.with_columns(pl.lit(str(file)).alias("_file"),
                               pl.col("raw").str.strip_chars().str.split(" ").list.eval(
                                   pl.element().filter(pl.element() != "")).alias("tokens"))
    lines = checker.check(lines, pl.col("tokens").list.len() < 2, reason="lines_without_items",
                          problem="line has a user id but no items", field=None,
                          expected="'user item1 item2 …' separated by spaces", text_col="raw")
    lines = lines.with_columns(pl.col("tokens").list.first().alias("user"), pl.col("tokens").list.slice(1).alias("item"))
    dup = pl.col("user").is_duplicated()
    if lines.select(dup.any()).item():
        rows = lines.filter(dup).sort("_line").head(2).rows(named=True)
        raise InputError(f"user '{rows[0]['user']}' has more than one line (first on line {rows[0]['_line']})",
                         path=file, line=rows[1]["_line"], text=rows[1]["raw"],
                         expected="one line per user holding the whole sequence")
    events = (lines.select("_file", "_line", "user", "item").explode("item")
              .with_columns((pl.int_range(pl.len()).over("user")).cast(pl.Int64).alias("ts")))
    all_tokens = pl.concat([events["user"], events["item"]])
    if id_type == "auto":
        id_type = "int" if all_tokens.str.contains(r"^-?\d+$").all() else "str"
    if id_type == "int":
        for col in ("user", "item"):
            bad = pl.col(col).str.contains(r"^-?\d+$").not_()
            events = checker.check(events, bad, reason=f"non_integer_{col}", problem=f"{col} id is not an integer",
                                   field=col, expected="integer ids (--id-type int)")
            events = events.with_columns(pl.col(col).cast(pl.Int64))
    events = events.select("user", "item", pl.lit(action).alias("action"), "ts",
                           pl.lit(None, pl.String).alias("surface"), pl.lit(None, pl.Float64).alias("duration"),
                           pl.lit(None, pl.String).alias("detail"), "_file", "_line")

    sources = [file]
    if item_attributes is None:
        item_attributes = attributes_beside(file)
    item_ids = events["item"].unique().sort()
    if item_attributes is not None:
        if not item_attributes.exists():
            raise InputError("item attributes file not found", path=item_attributes)
        try:
            attrs = json.loads(item_attributes.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e.msg}", path=item_attributes, line=e.lineno,
                             expected='{"item id": [attribute, …], …}') from None
        if not isinstance(attrs, dict):
            raise InputError("item attributes must be a JSON object", path=item_attributes,
                             expected='{"item id": [attribute, …], …}')
        keys = list(attrs)
        items = pl.DataFrame({"item": pl.Series(keys).cast(item_ids.dtype, strict=False),
                              "interests": [[str(a) for a in attrs[k]] for k in keys]},
                             schema={"item": item_ids.dtype, "interests": pl.List(pl.String)})
        n_bad = int(items["item"].is_null().sum())
        if n_bad:
            raise InputError(f"{n_bad} item id(s) in the attributes file do not match the sequences' id type",
                             path=item_attributes, expected=f"{id_type} item ids")
        items = items.with_columns(pl.lit(None, pl.String).alias("text")).select("item", "text", "interests")
        sources.append(item_attributes)
    else:
        items = pl.DataFrame({"item": item_ids}).with_columns(
            pl.lit(None, pl.String).alias("text"), pl.lit([], pl.List(pl.String)).alias("interests"))
    return RawLog(events=events, ts_unit="order", actions=[action], positive=[action], items=items,
                  sources=sources, skipped=skipped,
                  notes=["order-only input: ts is the position in the user's sequence, there is no real clock; "
                         "time-window features must be refused or adapted downstream"],
                  options={"action": action, "id_type": id_type})
