"""`taobao`: Taobao UserBehavior (Alibaba, Tianchi), CSV without a header:
`user_id,item_id,category_id,behavior_type,timestamp` with behaviour `pv` (item page view), `cart`, `fav`, `buy`.

Every behaviour is an action type; `cart`, `fav` and `buy` are positive by default and `pv` is not: a page view
alone is what the ranking data treats as an impression that was not engaged with. The category becomes the item's
interest. Timestamps are Unix seconds; the original has some far outside its 2017-11-25 .. 12-03 range (use
--min-time/--max-time with --skip-invalid to drop them, counted). The published file is cut inside its last line:
that line is reported (or, with --skip-invalid, dropped and counted), never read as a new action type.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pinnerformer.config import StrictModel
from pinnerformer.data.formats.base import Checker, RawLog, cast_int, read_lines, single_file, split_fields
from pinnerformer.errors import InputError

TAOBAO_ACTIONS = ["pv", "cart", "fav", "buy"]
LAYOUT = "user_id,item_id,category_id,behavior_type,timestamp (no header)"


class TaobaoOptions(StrictModel):
    """Options of the `taobao` format."""

    positive: list[str] = ["cart", "fav", "buy"]


def read_taobao(path: Path, options: TaobaoOptions, skip_invalid: bool) -> RawLog:
    file = single_file(path, ".csv", "UserBehavior.csv")
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    lines = read_lines(file, checker=checker)
    if lines.height and lines["raw"][0].lower().startswith("user"):
        raise InputError("the file has a header line; the Taobao UserBehavior file has none", path=file, line=1,
                         text=lines["raw"][0], expected=LAYOUT + " (use --format events for a file with a header)")
    rows = split_fields(lines, file, ",", ["user", "item", "category", "action", "ts"], checker, LAYOUT)
    for col, what in (("user", "user id"), ("item", "item id"), ("category", "category id")):
        rows = cast_int(rows, col, checker, what)
    rows = cast_int(rows, "ts", checker, "timestamp", expected="an integer Unix timestamp in seconds")
    rows = checker.check(rows, ~pl.col("action").is_in(TAOBAO_ACTIONS), reason="unknown_action",
                         problem="unknown behaviour type", field="behavior_type", expected=" / ".join(TAOBAO_ACTIONS))
    events = rows.select("user", "item", "action", "ts", pl.lit(None, pl.String).alias("surface"),
                         pl.lit(None, pl.Float64).alias("duration"), pl.lit(None, pl.String).alias("detail"),
                         "_file", "_line")
    items = (rows.group_by("item", maintain_order=True).agg(pl.col("category").first())
             .select("item", pl.lit(None, pl.String).alias("text"),
                     pl.concat_list(pl.col("category").cast(pl.String)).alias("interests")))
    return RawLog(events=events, ts_unit="s", actions=TAOBAO_ACTIONS, positive=list(options.positive), items=items,
                  sources=[file], skipped=skipped, options={"positive": list(options.positive)})
