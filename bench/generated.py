"""The generated datasets the benchmarks run on: planted-interest timelines of a fixed length (20,000
items in 200 groups, an action every 10 minutes), prepared by the real `data prepare` path."""

from __future__ import annotations

from pathlib import Path

from pinnerformer.data import Dataset
from pinnerformer.data.formats import EventsOptions, read_source
from pinnerformer.data.prepare import prepare
from pinnerformer.data.synthetic import planted_interest_log


def generated_dataset(folder: Path, n_users: int, events_per_user: int, n_items: int = 20_000) -> Dataset:
    log = planted_interest_log(n_users=n_users, n_items=n_items, n_groups=200, events_per_user=events_per_user,
                               gap_s=600)
    log.write_csv(folder / "log.csv")
    raw = read_source("events", folder / "log.csv", EventsOptions(positive=["click"], columns={"action": "action"}))
    prepare(raw, folder / "ds", "events", log=lambda s: None)
    return Dataset.open(folder / "ds")
