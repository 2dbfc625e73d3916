"""How ranking requests are cut from events: each event's visit (`visit_keys`), and the time split, the UTC
midnights that cut the requests into train / validation / test, and the feature period out of train (see
`data.requests`).

`--split` gives the cut-offs one of two ways: three fractions of the requests (`0.7,0.15,0.15`: each cut-off is the
midnight that leaves about that share before it), or the last UTC day of train and of validation
(`2001-03-23,2001-11-22`: train through 2001-03-23, validation through 2001-11-22, test after; each cut-off is the
midnight ending that day). Either way a request belongs to the period of its first action.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import polars as pl

from pinnerformer.data.clock import DAY, day_end_ts, parse_day, utc_day
from pinnerformer.errors import PinnerformerError

SPLIT_FORMS = ("three fractions TRAIN,VALIDATION,TEST of the requests (e.g. 0.7,0.15,0.15), or two UTC days "
               "TRAIN_LAST,VALIDATION_LAST (e.g. 2001-03-23,2001-11-22: train through the first, validation through "
               "the second, test after)")


def visit_keys(ev: pl.DataFrame, request: str, gap_s: int) -> pl.DataFrame:
    """Each event's visit, as `key`: its UTC day (`day`) or its session (`session`: a new one after an inactivity gap
    longer than gap_s). `within-session`: the session's events from its middle one on (the request starts there; the
    earlier half stays in the realtime sequence and the features, which read everything before the request's time,
    and leaves the candidates). `ev`: the timelines' order (by user, then time)."""
    if request == "day":
        return ev.with_columns((pl.col("ts") // DAY).cast(pl.String).alias("key"))
    new = (pl.col("user") != pl.col("user").shift(1)) | ((pl.col("ts") - pl.col("ts").shift(1)) > gap_s)
    ev = ev.with_columns(new.fill_null(True).cum_sum().cast(pl.String).alias("key"))
    if request == "within-session":
        ev = ev.filter(pl.col("ts") >= pl.col("ts").get(pl.len() // 2).over("key"))
    return ev


def parse_split(text: str) -> dict[str, tuple]:
    """--split text -> {"split": (train, validation, test) fractions} or {"split_dates": (train's last day,
    validation's last day)}, or a PinnerformerError naming --split."""
    parts = [p.strip() for p in text.split(",")]
    if any(re.match(r"\d{4}-", p) for p in parts):
        if len(parts) != 2:
            raise PinnerformerError(f"--split {text!r}: expected {SPLIT_FORMS}")
        dates = tuple(parse_day(p, f"--split {text!r}") for p in parts)
        check_date_order(dates)
        return {"split_dates": dates}
    try:
        fractions = tuple(float(p) for p in parts)
    except ValueError:
        fractions = ()
    if len(fractions) != 3:
        raise PinnerformerError(f"--split {text!r}: expected {SPLIT_FORMS}")
    return {"split": fractions}


def check_date_order(dates: tuple[dt.date, dt.date]) -> None:
    if dates[0] >= dates[1]:
        raise PinnerformerError(f"--split {dates[0]},{dates[1]}: the training period's last day ({dates[0]}) must "
                                f"come before the validation period's last day ({dates[1]}): expected "
                                "TRAIN_LAST,VALIDATION_LAST in time order")


def split_text(fractions: tuple[float, float, float] | None, dates: tuple[dt.date, dt.date] | None) -> str:
    """What --split was, as given: '0.7,0.15,0.15' or '2001-03-23,2001-11-22'."""
    return ",".join(map(str, dates)) if dates is not None else ",".join(f"{f:g}" for f in fractions or ())


def fraction_bounds(t: np.ndarray, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """UTC midnights cutting the request times at about the given cumulative fractions (each split non-empty)."""
    if not all(0 < f < 1 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise PinnerformerError(f"--split {split_text(fractions, None)}: expected three positive fractions "
                                "(train, validation, test) that sum to 1, or two UTC days TRAIN_LAST,VALIDATION_LAST")
    days = np.unique(t // DAY)
    if len(days) < 3:
        raise PinnerformerError(f"the requests span {len(days)} UTC day(s): a time split into train, validation "
                                "and test needs at least 3")
    ts = np.sort(t)
    at = lambda q: int(np.searchsorted(days, ts[min(len(ts) - 1, int(q * len(ts)))] // DAY))  # noqa: E731
    i0 = int(np.clip(at(fractions[0]), 1, len(days) - 2))  # train: days[:i0], validation: days[i0:i1], test: rest
    i1 = int(np.clip(at(fractions[0] + fractions[1]), i0 + 1, len(days) - 1))
    return int(days[i0]) * DAY, int(days[i1]) * DAY


def date_bounds(t: np.ndarray, dates: tuple[dt.date, dt.date]) -> tuple[int, int]:
    """The midnights ending the training period's and the validation period's last days: both days within the
    requests' span (the UTC days of their first and last request), and each period holding a request."""
    check_date_order(dates)
    given = f"--split {dates[0]},{dates[1]}"
    first, last = utc_day(int(t.min())), utc_day(int(t.max()))
    outside = [str(d) for d in dates if not first <= d <= last]
    if outside:
        raise PinnerformerError(f"{given}: {' and '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside the "
                                f"requests' days, {first} (the first request's) to {last} (the last one's), UTC: give "
                                "the last day of train and of validation within that span (test is the days after)")
    train_end, val_end = day_end_ts(dates[0]), day_end_ts(dates[1])
    held = {"train": int((t < train_end).sum()), "validation": int(((t >= train_end) & (t < val_end)).sum()),
            "test": int((t >= val_end).sum())}
    empty = [name for name, n in held.items() if n == 0]
    if empty:
        raise PinnerformerError(f"{given}: the {' and '.join(empty)} period{'s' if len(empty) > 1 else ''} would hold "
                                f"no request (the requests run from {first} to {last}, UTC; train through {dates[0]}, "
                                f"validation through {dates[1]}, test after): give other days")
    return train_end, val_end


def feature_bound(t_train: np.ndarray, share: float) -> int:
    """The UTC midnight that leaves about `share` of the training requests to the feature period (both non-empty)."""
    days = np.unique(t_train // DAY)
    if len(days) < 2:
        raise PinnerformerError(f"the training period spans {len(days)} UTC day(s): it cannot also give the "
                                "PinnerFormer a feature period of its own (use --feature-share 0, or a longer "
                                "training period)")
    ts = np.sort(t_train)
    i = int(np.clip(np.searchsorted(days, ts[min(len(ts) - 1, int(share * len(ts)))] // DAY), 1, len(days) - 1))
    return int(days[i]) * DAY


def period_codes(t: np.ndarray, train_end: int, val_end: int, feature_end: int | None) -> np.ndarray:
    """Each request's period, by its time: 0 train, 1 validation, 2 test, 3 feature (`data.requests.SPLIT_NAMES`)."""
    split = np.where(t < train_end, 0, np.where(t < val_end, 1, 2)).astype(np.int8)
    if feature_end is not None:
        split[t < feature_end] = 3
    return split
