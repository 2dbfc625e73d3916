"""Ratings as action types: a rule maps a numeric rating to an action by inclusive ranges (MovieLens)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from pinnerformer.data.formats.base import Checker
from pinnerformer.errors import InputError

DEFAULT_RATING_RULE = "5=love,4-4.5=like,3-3.5=neutral,0.5-2.5=dislike"
DEFAULT_RATING_POSITIVE = ["love", "like"]


@dataclass(frozen=True)
class RatingRule:
    """Maps a numeric rating to an action type by inclusive ranges, e.g. "5=love,4-4.5=like,...".

    Ratings outside every range are "unknown rating values": an error, never a guess.
    """

    ranges: tuple[tuple[float, float, str], ...]

    @staticmethod
    def parse(text: str) -> "RatingRule":
        ranges = []
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            m = re.fullmatch(r"([0-9.]+)(?:\s*-\s*([0-9.]+))?\s*=\s*([A-Za-z_][\w-]*)", part)
            if not m:
                raise InputError("cannot parse rating rule entry", field="rating-rule", text=part,
                                 expected="entries like '5=love' or '4-4.5=like', separated by commas")
            lo = float(m.group(1))
            hi = float(m.group(2)) if m.group(2) else lo
            if hi < lo:
                raise InputError("rating range is reversed", field="rating-rule", text=part,
                                 expected="LOW-HIGH with LOW <= HIGH")
            ranges.append((lo, hi, m.group(3)))
        if not ranges:
            raise InputError("empty rating rule", field="rating-rule", expected=DEFAULT_RATING_RULE)
        for i, (lo, hi, _) in enumerate(ranges):
            for lo2, hi2, _ in ranges[i + 1:]:
                if lo <= hi2 and lo2 <= hi:
                    raise InputError("rating rule ranges overlap", field="rating-rule", text=text,
                                     expected="disjoint ranges")
        return RatingRule(tuple(ranges))

    def actions(self) -> list[str]:
        out: list[str] = []
        for _, _, name in self.ranges:
            if name not in out:
                out.append(name)
        return out

    def expr(self, col: str) -> pl.Expr:
        e = pl.when(pl.lit(False)).then(pl.lit(None, dtype=pl.String))
        for lo, hi, name in self.ranges:
            e = e.when(pl.col(col).is_between(lo, hi)).then(pl.lit(name))
        return e.otherwise(pl.lit(None, dtype=pl.String))

    def __str__(self) -> str:
        fmt = lambda x: f"{x:g}"
        return ",".join(f"{fmt(lo)}={n}" if lo == hi else f"{fmt(lo)}-{fmt(hi)}={n}" for lo, hi, n in self.ranges)


def apply_rating_rule(df: pl.DataFrame, rule: RatingRule, checker: Checker) -> pl.DataFrame:
    """rating (Float64) -> action (String); unknown rating values raise or are skipped and counted."""
    df = df.with_columns(rule.expr("rating").alias("action"))
    return checker.check(df, pl.col("action").is_null(), reason="unknown_rating", problem="unknown rating value",
                         field="rating", expected=f"a rating covered by the rule '{rule}'")
