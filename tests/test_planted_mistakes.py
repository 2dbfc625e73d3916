"""Tests aimed at small, realistic mistakes that the rest of the suite let through when they were planted in a copy
of the code: each fails if the mistake is made."""

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest
import torch

from conftest import PLANTED_DAY as D0
from pinnerformer.data import Dataset
from pinnerformer.data.clock import day_end_ts
from pinnerformer.inference.daily_embed import DailyJob


def test_an_incremental_day_after_a_skipped_day_recomputes_the_skipped_days_users(trained, planted, tmp_path):
    ds = Dataset.open(planted)
    DailyJob(trained, ds, D0, tmp_path / "s").run(log=lambda s: None, progress=False)
    d2 = D0 + dt.timedelta(days=2)  # the job did not run on D0 + 1
    m = DailyJob(trained, ds, d2, tmp_path / "s").run(log=lambda s: None, progress=False)
    ev = ds.events()
    active = ev.filter((pl.col("ts") >= day_end_ts(D0)) & (pl.col("ts") < day_end_ts(d2)))["user"].n_unique()
    skipped_day = ev.filter((pl.col("ts") >= day_end_ts(D0)) & (pl.col("ts") < day_end_ts(D0 + dt.timedelta(1))))
    assert skipped_day.height > 0 and m.recomputed == active
    full = DailyJob(trained, ds, d2, tmp_path / "full").run(log=lambda s: None, progress=False)
    assert m.content_sha256 == full.content_sha256


def test_the_as_of_cut_off_excludes_an_event_exactly_at_midnight(tmp_path, cli):
    day = dt.date(2021, 3, 1)
    midnight = day_end_ts(day)
    rows = [(u, i % 7, "click", midnight - 3600 * (20 - i)) for u in range(40) for i in range(12)]
    rows += [(0, 6, "click", midnight)]  # user 0 acts exactly at midnight, the first second of the next day
    pl.DataFrame(rows, schema=["user", "item", "action", "timestamp"], orient="row").write_csv(tmp_path / "log.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--positive", "click").exit_code == 0
    from pinnerformer.inference.shards import user_ranges_as_of

    ds = Dataset.open(tmp_path / "ds")
    starts, ends = user_ranges_as_of(ds, np.array([0, 1]), day_end_ts(day))
    assert (ends - starts).tolist() == [12, 12]  # the midnight event belongs to the next day
    assert int(ds.timelines.ts[ends[0]]) == midnight


def test_events_at_the_same_second_keep_their_input_order(tmp_path, cli):
    g = np.random.default_rng(0)
    items = g.permutation(3000)
    rows = [(1, int(i), "click", 1_700_000_000 + (k // 1000)) for k, i in enumerate(items)]  # 1,000 per second
    pl.DataFrame(rows, schema=["user", "item", "action", "timestamp"], orient="row").write_csv(tmp_path / "log.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--positive", "click").exit_code == 0
    ds = Dataset.open(tmp_path / "ds")
    got = ds.items["item_id"].to_numpy()[np.asarray(ds.timelines.item)]
    assert got.tolist() == items.tolist()


def test_the_label_window_is_in_days_not_hours():
    from pinnerformer.data.timelines import Timelines
    from pinnerformer.objectives.examples import ExampleConfig, ExampleSampler

    hours = np.arange(0, 24 * 6, 2)  # an action every 2 hours for 6 days, all positive
    tl = Timelines(offsets=np.array([0, len(hours)]), item=np.arange(len(hours), dtype=np.int32),
                   action=np.ones(len(hours), np.int16), ts=(1_600_000_000 + hours * 3600).astype(np.int64),
                   surface=np.full(len(hours), -1, np.int16), duration=np.full(len(hours), np.nan, np.float32))
    smp = ExampleSampler(tl, np.array([1]), tl.full(), ExampleConfig(max_len=8, max_labels=100, window_days=1),
                         "all-action")
    assert smp.window == 86400.0
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(50):
        b = smp.sample(np.array([0]), rng)
        newest = int(b.ends[0]) - 1
        gaps += [(hours[i] - hours[newest]) for i in b.q_item]
    assert max(gaps) == 24 and min(gaps) == 2  # labels up to exactly one day ahead, never beyond


def test_hit_rate_and_ndcg_at_exactly_k():
    from pinnerformer.evaluation.metrics import hit_rate_at_k, ndcg_at_k, recall_at_k

    ranks = [np.array([9]), np.array([10]), np.array([0])]  # 0-based: rank 9 is the 10th place, inside the top 10
    assert hit_rate_at_k(ranks, 10).tolist() == [1.0, 0.0, 1.0]
    assert recall_at_k(ranks, 10).tolist() == [1.0, 0.0, 1.0]
    assert ndcg_at_k(ranks, 10).tolist() == pytest.approx([1 / math.log2(11), 0.0, 1.0])


def test_the_eager_loss_masks_the_examples_other_positives():
    """Query 0's example also has item 2 as a positive: with the own-positive mask item 2 is not its negative."""
    from pinnerformer.objectives.examples import ExampleBatch
    from pinnerformer.objectives.sampled_softmax import LossConfig, SampledSoftmaxLoss

    n_items = 5
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]])
    batch = ExampleBatch(users=np.array([0, 1]), starts=np.array([0, 0]), ends=np.array([1, 1]),
                         q_example=np.array([0, 1]), q_position=np.array([0, 0]), q_item=np.array([0, 1]),
                         label_example=np.array([0, 0, 1]), label_item=np.array([0, 2, 1]))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = torch.tensor(1.0)

    def loss(mask_own: bool) -> float:
        cfg = LossConfig(negatives="in-batch", logq=False, mask_own_positives=mask_own)
        obj = SampledSoftmaxLoss(cfg, n_items, seed=0)
        t = {k: torch.as_tensor(v) for k, v in obj.host_inputs(batch, torch.Generator()).items()}
        return obj(q, lambda ids: table[ids], tau, t, 2).item()

    # pool = the batch's labels {0, 1}: query 0 (item 0) sees negative 1; query 1 (item 1) sees negative 0
    s = lambda a, b: float(q[a] @ table[b])  # noqa: E731
    want = np.mean([math.log(math.exp(s(0, 0)) + math.exp(s(0, 1))) - s(0, 0),
                    math.log(math.exp(s(1, 1)) + math.exp(s(1, 0))) - s(1, 1)])
    assert loss(True) == pytest.approx(want, rel=1e-6) == pytest.approx(loss(False), rel=1e-6)
    # add item 2 to the pool through query 1's label: now it is a negative of query 0 unless masked
    batch.q_item, batch.label_item = np.array([0, 2]), np.array([0, 2, 2])
    batch.label_example = np.array([0, 0, 1])
    masked, unmasked = loss(True), loss(False)
    q0_masked = math.log(math.exp(s(0, 0))) - s(0, 0)  # item 2 is query 0's own positive: masked; pool {0, 2}
    q1 = math.log(math.exp(s(1, 2)) + math.exp(s(1, 0))) - s(1, 2)
    assert masked == pytest.approx(np.mean([q0_masked, q1]), rel=1e-6)
    q0_unmasked = math.log(math.exp(s(0, 0)) + math.exp(s(0, 2))) - s(0, 0)
    assert unmasked == pytest.approx(np.mean([q0_unmasked, q1]), rel=1e-6) and unmasked > masked
