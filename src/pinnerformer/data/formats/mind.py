"""`mind`: MIND (Microsoft News) behaviours, `behaviors.tsv` + `news.tsv`, tab-separated without headers.

A behaviours row is one request: impression id, user id, time (`M/D/YYYY h:mm:ss AM/PM`, taken as UTC), the
user's click history before that week (news ids, order only, no times) and the impressions `N123-1` (shown and
clicked) / `N456-0` (shown, not clicked). Events:

    click        an impression that was clicked (positive), at the request's time
    impression   an impression that was not clicked, at the request's time (the ranking data's negatives)
    history      a history click (positive); history has no times, so its clicks are placed, in order, one second
                 apart ending one second before the UTC day of the user's first request (MIND's history precedes the
                 logged period): their times are synthetic, their order is real (a note in the manifest says so)

The impression id is kept as each impression's source detail (`detail`), so that a request's candidates can be
found again. `news.tsv` gives the items' text (title) and interests (category, subcategory); it covers only part
of the shown items in the sample: the others have neither (counted in the dataset's notes).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pinnerformer.config import StrictModel
from pinnerformer.data.clock import DAY
from pinnerformer.data.formats.base import Checker, RawLog, read_lines, split_fields
from pinnerformer.errors import InputError

MIND_ACTIONS = ["history", "click", "impression"]
BEHAVIORS = "impression_id<TAB>user_id<TAB>time<TAB>history<TAB>impressions"
NEWS = "news_id<TAB>category<TAB>subcategory<TAB>title<TAB>abstract<TAB>url<TAB>title_entities<TAB>abstract_entities"


class MindOptions(StrictModel):
    """Options of the `mind` format."""

    positive: list[str] = ["click", "history"]


def read_mind(path: Path, options: MindOptions, skip_invalid: bool) -> RawLog:
    folder = path if path.is_dir() else path.parent
    behaviors, news = folder / "behaviors.tsv", folder / "news.tsv"
    if not behaviors.exists():
        raise InputError("missing file behaviors.tsv", path=folder, expected="a MIND folder with behaviors.tsv "
                         "(and news.tsv)")
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    rows = split_fields(read_lines(behaviors, checker=checker), behaviors, "\t",
                        ["request", "user", "time", "history", "impressions"], checker, BEHAVIORS)
    parsed = pl.col("time").str.to_datetime("%m/%d/%Y %I:%M:%S %p", strict=False, time_unit="ms").dt.epoch("s")
    rows = checker.check(rows, parsed.is_null(), reason="unparseable_time", problem="time is not parseable",
                         field="time", expected="M/D/YYYY h:mm:ss AM/PM, e.g. 11/12/2019 2:14:46 PM")
    rows = rows.with_columns(parsed.alias("ts"))
    shown = (rows.select("request", "user", "ts", "_file", "_line", pl.col("impressions").str.split(" ").alias("imp"))
             .explode("imp").filter(pl.col("imp").is_not_null() & (pl.col("imp") != "")))
    pair = pl.col("imp").str.extract(r"^(.+)-([01])$", 1), pl.col("imp").str.extract(r"^(.+)-([01])$", 2)
    shown = shown.with_columns(pair[0].alias("item"), pair[1].alias("clicked"))
    shown = checker.check(shown, pl.col("item").is_null(), reason="malformed_impressions", field="impressions",
                          problem="impression is not NEWS_ID-0 or NEWS_ID-1", expected="e.g. N43266-0 N12345-1",
                          text_col="imp")
    impressions = shown.select("user", "item", pl.when(pl.col("clicked") == "1").then(pl.lit("click"))
                               .otherwise(pl.lit("impression")).alias("action"), "ts",
                               pl.col("request").alias("detail"), "_file", "_line")
    # history: order only, taken from each user's first request, placed before that request's UTC day (it was
    # clicked before the logged period), so that the snapshot of the day before the request holds it
    first = rows.sort("ts", maintain_order=True).unique("user", keep="first", maintain_order=True)
    history = (first.select("user", "ts", "_file", "_line", pl.col("history").str.split(" ").alias("item"))
               .explode("item").filter(pl.col("item").is_not_null() & (pl.col("item") != ""))
               .with_columns(pl.int_range(pl.len()).over("user").alias("pos"), pl.len().over("user").alias("n"))
               .select("user", "item", pl.lit("history").alias("action"),
                       (pl.col("ts") // DAY * DAY - pl.col("n") + pl.col("pos")).alias("ts"),
                       pl.lit(None, pl.String).alias("detail"),
                       "_file", "_line"))
    events = pl.concat([history, impressions]).select(
        "user", "item", "action", pl.col("ts").cast(pl.Int64), pl.lit(None, pl.String).alias("surface"),
        pl.lit(None, pl.Float64).alias("duration"), "detail", "_file", "_line")
    sources = [behaviors]
    if news.exists():
        nw = split_fields(read_lines(news, checker=checker), news, "\t",
                          ["item", "category", "subcategory", "title", "abstract", "url", "title_entities",
                           "abstract_entities"], checker, NEWS)
        items = nw.select("item", pl.concat_str([pl.col("title"), pl.lit(". "), pl.col("category")]).alias("text"),
                          pl.concat_list("category", "subcategory").alias("interests"))
        sources.append(news)
    else:
        items = pl.DataFrame(schema={"item": pl.String, "text": pl.String, "interests": pl.List(pl.String)})
    return RawLog(events=events, ts_unit="s", actions=MIND_ACTIONS, positive=list(options.positive), items=items,
                  sources=sources, skipped=skipped, options={"positive": list(options.positive)},
                  notes=["MIND history clicks have no times: they are placed in order, one second apart, just before "
                         "the UTC day of each user's first request (their order is real, their times are not)"])
