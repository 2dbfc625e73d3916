"""Days and Unix seconds: the one place where a YYYY-MM-DD text becomes a day and a day becomes its bounds (UTC)."""

from __future__ import annotations

import datetime as dt

from pinnerformer.errors import PinnerformerError

DAY = 86400


def parse_day(text: str, option: str) -> dt.date:
    """A YYYY-MM-DD day; `option` names where the text came from (a command-line option) in the error."""
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise PinnerformerError(f"{option}: {text!r} is not a day (expected YYYY-MM-DD)") from None


def day_start_ts(day: dt.date) -> int:
    """Unix seconds of midnight UTC at the start of `day`."""
    return int(dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc).timestamp())


def day_end_ts(day: dt.date) -> int:
    """Unix seconds of the end of `day` in UTC (= midnight starting the next day): the as-of cut-off."""
    return day_start_ts(day + dt.timedelta(days=1))


def utc_day(ts: int) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).date()
