"""The daily embedding job: incremental carry-over, equality with a full recompute, idempotence, kill-safety,
Ray == local, and the errors a user can run into."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.data.clock import day_end_ts
from pinnerformer.inference.snapshot import Snapshot
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import retrieval_loop

from conftest import PLANTED_DAY as D0  # about 20 planted users act on any day


def job(trained, planted, day, root, **kw):
    return DailyJob(trained, Dataset.open(planted), day, root, **kw)


def users_with_events(planted, lo: int | None, hi: int) -> np.ndarray:
    """Independent of the job's code: from events.parquet with polars."""
    ev = pl.read_parquet(planted / "events.parquet")
    f = pl.col("ts") < hi if lo is None else (pl.col("ts") >= lo) & (pl.col("ts") < hi)
    return np.sort(ev.filter(f)["user"].unique().to_numpy())


def test_incremental_carries_over_bit_identical_and_recomputes_only_that_days_users(trained, planted, tmp_path):
    root = tmp_path / "snaps"
    m0 = job(trained, planted, D0, root).run(log=lambda s: None, progress=False)
    assert m0.carried_over == 0 and m0.recomputed == len(users_with_events(planted, None, day_end_ts(D0)))
    d1 = D0 + dt.timedelta(days=1)
    m1 = job(trained, planted, d1, root).run(log=lambda s: None, progress=False)
    active = users_with_events(planted, day_end_ts(D0), day_end_ts(d1))
    assert len(active) > 5 and m1.recomputed == len(active)
    s0, s1 = Snapshot.open(root / D0.isoformat()), Snapshot.open(root / d1.isoformat())
    assert np.array_equal(s1.users, users_with_events(planted, None, day_end_ts(d1)))
    assert m1.carried_over == len(s1.users) - len(active) == len(np.setdiff1d(s0.users, active))
    carried = ~np.isin(s1.users, active)
    rows0 = np.searchsorted(s0.users, s1.users[carried])
    assert s1.vectors[carried].tobytes() == s0.vectors[rows0].tobytes()  # bit-identical copies
    # recomputed users really changed (they have new actions)
    again = np.isin(s1.users, s0.users) & ~carried
    assert (s1.vectors[again] != s0.vectors[np.searchsorted(s0.users, s1.users[again])]).any(1).all()
    assert m1.previous_snapshot.content_sha256 == m0.content_sha256
    ids = Dataset.open(planted).users["user_id"].to_numpy()
    assert s1.table.column("user_id").to_numpy().tolist() == ids[s1.users].tolist()


def test_incremental_equals_full_recompute(trained, planted, tmp_path):
    d2 = D0 + dt.timedelta(days=2)
    for day in (D0, D0 + dt.timedelta(days=1), d2):
        job(trained, planted, day, tmp_path / "incr", shard_users=7).run(log=lambda s: None, progress=False)
    full = job(trained, planted, d2, tmp_path / "full", shard_users=64).run(log=lambda s: None, progress=False)
    incr = Snapshot.open(tmp_path / "incr" / d2.isoformat())
    assert incr.manifest.carried_over > 0 and full.carried_over == 0
    other = Snapshot.open(tmp_path / "full" / d2.isoformat())
    assert np.array_equal(incr.users, other.users)
    assert np.array_equal(incr.vectors, other.vectors)
    assert incr.manifest.content_sha256 == full.content_sha256
    # another batch size changes kernel shapes: equal to float32 rounding, not necessarily bit for bit
    job(trained, planted, d2, tmp_path / "b64", batch_size=64).run(log=lambda s: None, progress=False)
    np.testing.assert_allclose(Snapshot.open(tmp_path / "b64" / d2.isoformat()).vectors, other.vectors, atol=1e-5)


def test_float16_snapshot(trained, planted, tmp_path):
    m16 = job(trained, planted, D0, tmp_path / "h", dtype="float16").run(log=lambda s: None, progress=False)
    job(trained, planted, D0, tmp_path / "f").run(log=lambda s: None, progress=False)
    h, f = Snapshot.open(tmp_path / "h" / D0.isoformat()), Snapshot.open(tmp_path / "f" / D0.isoformat())
    vtype = pq.read_schema(h.path / "embeddings.parquet").field("vector").type
    assert str(vtype.value_type) == "halffloat" and vtype.list_size == 32
    assert h.vectors.dtype == np.float16 and m16.dim == 32
    np.testing.assert_allclose(h.vectors.astype(np.float32), f.vectors, atol=2e-3)
    # a float32 run next day cannot carry float16 vectors: it says so and recomputes everyone
    logs = []
    m = job(trained, planted, D0 + dt.timedelta(days=1), tmp_path / "h").run(log=logs.append, progress=False)
    assert m.carried_over == 0 and "is float16, not float32" in logs[0]


def test_compiled_job_matches_eager_and_never_mixes_with_it(trained, planted, tmp_path):
    """--compile runs torch.compile'd kernels: the same vectors to float32 rounding, and a compiled day never carries
    over eager vectors (or the other way round), since the two differ in the last bits."""
    d1 = D0 + dt.timedelta(days=1)
    eager = job(trained, planted, D0, tmp_path / "snaps").run(log=lambda s: None, progress=False)
    lines: list[str] = []
    comp = job(trained, planted, d1, tmp_path / "snaps", compile=True).run(log=lines.append, progress=False)
    assert eager.compile is False and comp.compile is True
    assert comp.carried_over == 0 and any("computed by the eager model: full computation" in x for x in lines)
    full_eager = job(trained, planted, d1, tmp_path / "eager").run(log=lambda s: None, progress=False)
    a, b = Snapshot.open(tmp_path / "snaps" / d1.isoformat()), Snapshot.open(tmp_path / "eager" / d1.isoformat())
    assert np.array_equal(a.users, b.users) and full_eager.recomputed == comp.recomputed
    np.testing.assert_allclose(a.vectors, b.vectors, atol=2e-5)
    with pytest.raises(PinnerformerError, match="--compile is for the local engine"):
        job(trained, planted, d1, tmp_path / "r", compile=True).run(engine="ray", log=lambda s: None, progress=False)


def test_rerun_is_idempotent_and_force_reproduces(trained, planted, tmp_path):
    root = tmp_path / "snaps"
    m = job(trained, planted, D0, root).run(log=lambda s: None, progress=False)
    before = (root / D0.isoformat() / "manifest.json").read_text()
    logs = []
    again = job(trained, planted, D0, root).run(log=logs.append, progress=False)
    assert "already complete" in logs[0] and again == m
    assert (root / D0.isoformat() / "manifest.json").read_text() == before
    forced = job(trained, planted, D0, root).run(force=True, log=lambda s: None, progress=False)
    assert forced.content_sha256 == m.content_sha256 and forced.created_at >= m.created_at
    assert sorted(p.name for p in root.iterdir()) == [D0.isoformat()]  # no staging or replaced dirs left


def _embed_cmd(trained, planted, root, *extra):
    return [sys.executable, "-m", "pinnerformer.cli", "embed", "-r", str(trained), "-d", str(planted),
            "--as-of", D0.isoformat(), "-o", str(root), "--no-progress", *extra]


def test_killed_run_restarts_to_the_identical_snapshot(trained, planted, tmp_path):
    ref = job(trained, planted, D0, tmp_path / "ref").run(log=lambda s: None, progress=False)
    root = tmp_path / "killed"
    staging = root / f".staging-{D0.isoformat()}" / "parts"
    # one user per shard: hundreds of part files, so the kill lands mid-job
    kills = 0
    for want in (3, 40):  # kill twice, at different points
        p = subprocess.Popen(_embed_cmd(trained, planted, root, "--shard-users", "1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if staging.exists() and len(list(staging.glob("part-*.parquet"))) >= want:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        p.wait()
        assert not (root / D0.isoformat()).exists()  # never visible as complete
    assert kills == 2
    done_before = len(list(staging.glob("part-*.parquet")))
    assert done_before >= 40
    r = subprocess.run(_embed_cmd(trained, planted, root, "--shard-users", "1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "already done by an earlier attempt" in " ".join(r.stderr.split())
    snap = Snapshot.open(root / D0.isoformat())
    assert snap.manifest.content_sha256 == ref.content_sha256
    assert len(np.unique(snap.users)) == len(snap.users) == ref.users
    assert [p.name for p in root.iterdir()] == [D0.isoformat()]


def test_staging_from_a_different_plan_is_discarded(trained, planted, tmp_path):
    root = tmp_path / "snaps"
    staging = root / f".staging-{D0.isoformat()}"
    (staging / "parts").mkdir(parents=True)
    (staging / "plan.json").write_text(json.dumps({"as_of": "something else"}))
    (staging / "parts" / "part-00000.parquet").write_text("garbage from another job")
    m = job(trained, planted, D0, root).run(log=lambda s: None, progress=False)
    ref = job(trained, planted, D0, tmp_path / "ref").run(log=lambda s: None, progress=False)
    assert m.content_sha256 == ref.content_sha256


def test_ray_engine_equals_local(trained, planted, tmp_path):
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    local = job(trained, planted, D0, tmp_path / "local", shard_users=50).run(log=lambda s: None, progress=False)
    ray = job(trained, planted, D0, tmp_path / "ray", shard_users=50).run(
        engine="ray", ray_actors=2, ray_cpus_per_actor=0.5, log=lambda s: None, progress=False)
    assert ray.engine == "ray" and ray.users == local.users
    assert ray.content_sha256 == local.content_sha256
    # and incrementally: the next day on Ray carries over from the local snapshot
    d1 = D0 + dt.timedelta(days=1)
    a = job(trained, planted, d1, tmp_path / "local", shard_users=50).run(log=lambda s: None, progress=False)
    b = job(trained, planted, d1, tmp_path / "ray", shard_users=50).run(engine="ray", log=lambda s: None,
                                                                        progress=False)
    assert b.carried_over == a.carried_over > 0 and b.content_sha256 == a.content_sha256


def test_embed_errors(trained, planted, tmp_path, cli):
    base = ["embed", "-r", trained, "-d", planted, "-o", tmp_path / "s", "--no-progress"]
    r = cli(*base, "--as-of", "2020-13-01")
    assert r.exit_code == 2 and "'2020-13-01' is not a day (expected YYYY-MM-DD)" in r.stderr
    r = cli(*base, "--as-of", "2019-01-01")
    assert r.exit_code == 2 and "before the data's first action" in r.stderr
    r = cli(*base, "--as-of", D0.isoformat(), "--dtype", "int8")
    assert r.exit_code == 2 and "dtype 'int8': expected one of float16, float32" in r.stderr
    r = cli(*base, "--as-of", D0.isoformat(), "--engine", "spark")
    assert r.exit_code == 2 and "engine 'spark': expected local or ray" in r.stderr
    r = cli(*base, "--as-of", D0.isoformat(), "--device", "tpu")
    assert r.exit_code == 2 and "device 'tpu': expected cpu, cuda or auto" in r.stderr
    import torch

    if not torch.cuda.is_available():
        r = cli(*base, "--as-of", D0.isoformat(), "--device", "cuda")
        assert r.exit_code == 2 and "no CUDA GPU is visible" in r.stderr
    assert not (tmp_path / "s" / D0.isoformat()).exists()
    r = cli("embed", "-r", tmp_path / "nope", "-d", planted, "-o", tmp_path / "s", "--as-of", D0.isoformat())
    assert r.exit_code == 2 and "does not exist (is" in r.stderr
    # a day made by another checkpoint is not silently kept or replaced
    assert cli(*base, "--as-of", D0.isoformat()).exit_code == 0
    m = json.loads((tmp_path / "s" / D0.isoformat() / "manifest.json").read_text())
    r = cli(*base, "--as-of", D0.isoformat(), "--dtype", "float16")
    assert r.exit_code == 2 and "made by another checkpoint or dtype: use --force" in r.stderr
    assert json.loads((tmp_path / "s" / D0.isoformat() / "manifest.json").read_text()) == m
    # a snapshot root is not a snapshot
    with pytest.raises(Exception, match="is a snapshot root, not a snapshot"):
        Snapshot.open(tmp_path / "s")


def test_order_only_dataset_cannot_be_embedded_by_day(tmp_path, cli):
    rng = np.random.default_rng(0)
    (tmp_path / "seq.txt").write_text("".join(f"u{u} " + " ".join(f"i{i}" for i in rng.integers(0, 30, 12)) + "\n"
                                              for u in range(100)))
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "seq.txt", "-o", tmp_path / "ds").exit_code == 0
    cfg = load_config("small", overrides=json.loads(json.dumps({**TINY, "optim": {**TINY["optim"], "max_epochs": 1}})))
    retrieval_loop(Dataset.open(tmp_path / "ds"), cfg, tmp_path / "run", log=lambda s: None).fit(progress=False)
    r = cli("embed", "-r", tmp_path / "run", "-d", tmp_path / "ds", "-o", tmp_path / "s", "--as-of", "2020-01-01")
    assert r.exit_code == 2 and "is order-only" in r.stderr


def test_simulate_daily_replays_the_job_and_scores_each_day(trained, planted, tmp_path, cli):
    last = D0 + dt.timedelta(days=3)
    r = cli("simulate-daily", "-r", trained, "-d", planted, "--from", D0.isoformat(), "--to", last.isoformat(),
            "-o", tmp_path / "sim", "--no-progress")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sim" / "staleness.json").read_text())
    assert [d["day"] for d in res["days"]] == [(D0 + dt.timedelta(days=i)).isoformat() for i in range(4)]
    test_users = set(np.flatnonzero((pl.read_parquet(trained / "split.parquet")["split"] == "test").to_numpy()))
    ev = pl.read_parquet(planted / "events.parquet")
    for i, d in enumerate(res["days"]):
        day = D0 + dt.timedelta(days=i)
        lo = None if i == 0 else day_end_ts(day - dt.timedelta(days=1))
        assert d["recomputed"] == len(users_with_events(planted, lo, day_end_ts(day)))
        assert d["recomputed"] + d["carried_over"] == d["users_in_snapshot"]
        # eligible: test users with an action before the day's end and a positive (click) in the next 14 days
        t = day_end_ts(day)
        before = set(ev.filter(pl.col("ts") < t)["user"].to_list())
        pos = Dataset.open(planted).manifest.positive_codes
        after = set(ev.filter((pl.col("ts") >= t) & (pl.col("ts") < t + 14 * 86400) & pl.col("action").is_in(pos))[
            "user"].to_list())
        assert d["eligible_test_users"] == len(test_users & before & after)
        assert d["frozen"]["age_days"] == i and d["weekly"]["age_days"] == i % 7
        assert d["frozen"]["users"] <= d["eligible_test_users"]
    first = res["days"][0]
    assert first["frozen"]["stale_vectors"] == 0 and first["frozen"]["recall@10"] == \
        first["frozen"]["recall@10_daily_same_users"]  # on the first day the frozen snapshot is today's
    assert res["daily_user_windows"] == sum(d["eligible_test_users"] for d in res["days"]) > 0
    assert res["pooled"]["frozen"]["user_windows"] == sum(d["frozen"]["users"] for d in res["days"])
    assert (tmp_path / "sim" / "staleness.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "sim" / "snapshots").iterdir()) == [d["day"] for d in res["days"]]
    assert "| day | recomputed |" in r.stdout
    r = cli("simulate-daily", "-r", trained, "-d", planted, "--from", last.isoformat(), "--to", D0.isoformat())
    assert r.exit_code == 2 and "is before --from" in r.stderr


def test_ray_engine_joins_an_existing_cluster(trained, planted, tmp_path):
    """scripts/ray_cluster.sh starts a long-lived loopback cluster; the job joins it by address."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    env = dict(os.environ, RAY=str(__import__("pathlib").Path(sys.executable).parent / "ray"), PORT="6391", CPUS="2")
    script = repo / "scripts" / "ray_cluster.sh"
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True, env=env)
    assert started.returncode == 0, started.stderr
    address = started.stdout.strip().splitlines()[-1]
    try:
        ref = job(trained, planted, D0, tmp_path / "local", shard_users=60).run(log=lambda s: None, progress=False)
        cmd = _embed_cmd(trained, planted, tmp_path / "joined", "--engine", "ray", "--ray-address", address,
                         "--shard-users", "60")
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, RAY_AUTH_MODE="token"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert Snapshot.open(tmp_path / "joined" / D0.isoformat()).manifest.content_sha256 == ref.content_sha256
    finally:
        subprocess.run(["bash", script, "stop"], capture_output=True, env=env)


def test_simulate_daily_on_a_period_without_eligible_users_warns_and_writes_no_nan(trained, planted, tmp_path, cli):
    """A newcomer's simulate-daily printed NaN and drew an empty chart."""
    r = cli("simulate-daily", "-r", trained, "-d", planted, "--from", "2020-11-20", "--to", "2020-11-21", "-o",
            tmp_path / "sim", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "warning: only 0 test user-window(s)" in " ".join(r.stderr.split()) and "nan" not in r.stdout.lower()
    text = (tmp_path / "sim" / "staleness.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in staleness.json"))
    assert (tmp_path / "sim" / "staleness.png").stat().st_size > 5000
