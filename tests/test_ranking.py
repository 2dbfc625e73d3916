"""The ranker end to end on generated requests with planted structure (`planted_request_log`: the saved
candidates are the ones that resemble the user's actions of the last two hours, and nothing else tells them
apart): exact request counts and split, no leakage (the request's own actions and the request's day cannot reach
its features), TransAct beating the ranker without sequence features by a wide margin in HIT@3, the CLI
(`rank prepare | train | evaluate | score`) and its messages on bad input; and `rank prepare`'s options on requests of
every size from 1 to 10 (`sized`): a split by dates, training requests thinned and validation and test ones whole,
--min-candidates, and `--item-vectors auto` passing over a PinnerFormer that learned nothing."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from pinnerformer.data.clock import DAY
from pinnerformer.data.dataset import Dataset, set_content_vectors
from pinnerformer.data.requests import RankData, RequestOptions, build_requests, parse_heads
from pinnerformer.data.synthetic import planted_request_log
from pinnerformer.data.timelines import Timelines
from pinnerformer.features.rank_batch import build_rank_batch
from pinnerformer.models.embedding import embed_users
from tests.conftest import TINY

USERS, DAYS = 120, 12
# small and quick; the time-window mask hides at most the last hour (the planted browsing is two hours back)
RANK_TINY = {"device": "cpu", "optim": {"batch_size": 128, "lr": 3e-3, "warmup_steps": 10, "max_epochs": 4,
                                        "patience": 2},
             "data": {"epoch_rows": 6000, "max_val_requests": 400},
             "model": {"transact": {"seq_len": 16, "time_window_hours": 1.0}, "mlp": [64], "item_id_dim": 8}}


@pytest.fixture(scope="module")
def planted_rank(tmp_path_factory, cli=None):
    from pinnerformer.ranking.prepare import prepare_ranking
    from pinnerformer.training.config import load_config
    from pinnerformer.training.retrieval import retrieval_loop
    from tests.conftest import run_cli

    d = tmp_path_factory.mktemp("planted-rank")
    planted_request_log(n_users=USERS, days=DAYS).write_csv(d / "log.csv")
    r = run_cli("data", "prepare", "-f", "events", "-i", d / "log.csv", "-o", d / "ds", "--action-col", "action",
                "--positive", "click,save")
    assert r.exit_code == 0, r.output
    # frozen item vectors (Pinterest: PinSage): the item's group, one-hot, plus noise
    ids = Dataset.open(d / "ds").items["item_id"].cast(pl.Int64).to_numpy()
    vec = np.eye(16, dtype=np.float32)[ids % 10] + np.random.default_rng(0).normal(0, 0.1, (len(ids), 16))
    set_content_vectors(d / "ds", vec, "planted-groups")
    ds = Dataset.open(d / "ds")
    opts = RequestOptions(request="session", heads=parse_heads("save=save", ds.manifest.action_names()))
    pf_until = build_requests(ds, opts).pf_until
    # the PinnerFormer behind the feature: tiny, and trained on the training period only (checked by prepare)
    cfg = load_config("small", overrides=json.loads(json.dumps(
        {**TINY, "eval": {"until": pf_until, "test_fraction": 0.0, "val_fraction": 0.2},
         "optim": {**TINY["optim"], "max_epochs": 2}})))
    retrieval_loop(ds, cfg, d / "pf", log=lambda s: None).fit(progress=False)
    prepare_ranking(d / "ds", d / "rank", opts, pinnerformer=d / "pf", log=lambda s: None)
    return d


def test_requests_candidates_and_time_split_are_exact(planted_rank):
    rd = RankData(planted_rank / "rank")
    # each user-day: a browsing session (6 clicked items) and a request session (8 shown, 3 saved)
    assert rd.n_requests == USERS * DAYS * 2
    assert len(rd.cand_item) == USERS * DAYS * (6 + 8)
    assert rd.labels.sum() == USERS * DAYS * 3 and rd.manifest.skipped == {}
    sizes = np.diff(rd.cand_start)
    assert sorted(set(sizes.tolist())) == [6, 8]
    # 70 / 15 / 15 % of the requests, cut at midnights: 240 requests a day -> days 0-7, 8-9, 10-11; the first half
    # of the training period is the PinnerFormer's (days 0-3), the ranker trains on days 4-7
    s = rd.manifest.splits
    assert (s["feature"].requests, s["train"].requests, s["validation"].requests, s["test"].requests) == (
        USERS * 2 * 4, USERS * 2 * 4, USERS * 2 * 2, USERS * 2 * 2)
    assert rd.manifest.train_end - rd.manifest.feature_end == 4 * DAY
    assert json.loads((planted_rank / "pf" / "config.json").read_text())["config"]["eval"]["until"] == \
        rd.manifest.feature_end == rd.manifest.pf_until
    assert s["test"].requests_with["save"] == USERS * 2 and s["test"].engaged["save"] == USERS * 2 * 3
    assert (rd.manifest.val_end - rd.manifest.train_end) == 2 * DAY
    assert all(rd.request_t[rd.requests_in("train")] < rd.manifest.train_end)
    assert all(rd.request_t[rd.requests_in("train")] >= rd.manifest.feature_end)
    assert all(rd.request_t[rd.requests_in("test")] >= rd.manifest.val_end)
    # the first day's requests have no vector of the day before; every later one has
    first_day = rd.request_t < rd.request_t.min() // DAY * DAY + DAY
    assert (~rd.has_vector == first_day).all()


def test_features_come_only_from_before_the_request_and_the_vector_from_before_its_day(planted_rank):
    rd = RankData(planted_rank / "rank")
    ds = rd.dataset()
    tl = ds.timelines
    ts = np.asarray(tl.ts)
    first = np.asarray(tl.offsets[:-1])[rd.request_user]
    assert (ts[rd.seq_end - 1][rd.seq_end > first] < rd.request_t[rd.seq_end > first]).all()
    assert (ts[rd.seq_end] >= rd.request_t).all()
    day0 = rd.request_t // DAY * DAY
    has = rd.snapshot_end > first
    assert (ts[rd.snapshot_end - 1][has] < day0[has]).all() and (ts[rd.snapshot_end] >= day0).all()

    test = rd.requests_in("test")
    reqs = test[np.diff(rd.cand_start)[test] == 8][:50]  # the 10:00 requests (the day's browsing came before)
    base = build_rank_batch(rd, tl, reqs, 16)

    def perturbed(keep: np.ndarray) -> Timelines:
        """The timelines with every event outside `keep` given another item and action (same times and count)."""
        item, action = np.array(tl.item), np.array(tl.action)
        rng = np.random.default_rng(0)
        item[~keep] = rng.integers(0, ds.manifest.n_items, (~keep).sum())
        action[~keep] = rng.integers(0, len(ds.manifest.actions), (~keep).sum())
        return Timelines(np.asarray(tl.offsets), item, action, ts, np.asarray(tl.surface),
                         np.asarray(tl.duration), tl.clock)

    # the request's own actions and everything after it changed: the sequences are the same
    pos = np.arange(tl.n_events)
    owner = tl.user_of_event()
    before_req = np.ones(tl.n_events, bool)
    for r in reqs:
        before_req &= ~((owner == rd.request_user[r]) & (pos >= rd.seq_end[r]))
    other = build_rank_batch(rd, perturbed(before_req), reqs, 16)
    for f in ("seq_action", "seq_item", "seq_age"):
        assert torch.equal(getattr(base, f), getattr(other, f))
    # the request's day changed (its earlier session included): the PinnerFormer vector is the same ...
    from pinnerformer.runs import RunDir

    model = RunDir(planted_rank / "pf").load_model(ds)
    before_day = np.ones(tl.n_events, bool)
    for r in reqs:
        before_day &= ~((owner == rd.request_user[r]) & (pos >= rd.snapshot_end[r]))
    u, e = rd.request_user[reqs], rd.snapshot_end[reqs]
    start = np.asarray(tl.offsets[:-1])[u]
    again = embed_users(model, perturbed(before_day), start, e, torch.device("cpu"))
    assert torch.allclose(again, torch.from_numpy(np.asarray(rd.user_vectors[reqs])), atol=1e-5)
    # ... while the realtime sequence does see that earlier session (it is before the request)
    seq_day = build_rank_batch(rd, perturbed(before_day), reqs, 16)
    assert not torch.equal(seq_day.seq_item, base.seq_item)


def test_transact_ranker_beats_the_ranker_without_sequence_features_in_hit_at_3(planted_rank):
    """The saved candidates resemble the day's earlier actions, and nothing else tells them: TransAct finds them, the
    ranker without a sequence (and without the counters) cannot; the point-in-time counters, which compare the
    candidate with the realtime sequence (sequence_match), find them too, in the network and in gradient-boosted
    trees."""
    from pinnerformer.ranking.evaluate import evaluate_ranking
    from pinnerformer.training.gbdt import train_gbdt
    from pinnerformer.training.ranking import load_rank_config, ranking_loop

    rd = RankData(planted_rank / "rank")
    runs = {}
    for name, seq, features in (("transact", "transact", False), ("no-sequence", "none", False),
                                ("counters", "none", True)):
        cfg = load_rank_config("default", overrides=json.loads(json.dumps(
            {**RANK_TINY, "model": {**RANK_TINY["model"], "sequence": seq, "features": features}})))
        ranking_loop(rd, cfg, planted_rank / name, log=lambda s: None).fit(progress=False)
        runs[name] = planted_rank / name
    train_gbdt(rd, load_rank_config("default", overrides={"learner": "gbdt", "gbdt": {"min_data_in_leaf": 20}}),
               planted_rank / "gbdt", log=lambda s: None, progress=False)
    runs["gbdt"] = planted_rank / "gbdt"
    report, _ = evaluate_ranking(rd, runs, "test", reference="no-sequence", n_boot=200, log=lambda s: None)
    hit = {n: report.models[n]["hit@3/save"].mean for n in report.models}
    # 3 of 8 candidates saved: random order puts 3·3/8 = 1.125 of them in the top 3 on average
    assert hit["random"] == pytest.approx(1.125, abs=0.15)
    assert hit["no-sequence"] < 1.5 and hit["item-rate"] < 1.5 and hit["popularity"] < 1.5
    assert hit["transact"] > 2.5 and hit["counters"] > 2.5 and hit["gbdt"] > 2.5
    lift = report.lifts["transact"]["hit@3/save"]
    assert lift.ci95[0] > 0.5  # paired bootstrap: the lower end of the interval is still +50%


def test_rank_cli_train_evaluate_score_and_bad_input(planted_rank, cli, tmp_path):
    rank = planted_rank / "rank"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(RANK_TINY))
    r = cli("rank", "train", "--data", rank, "--output", tmp_path / "run", "--config", cfg, "--max-steps", "20",
            "--no-progress")
    assert r.exit_code == 0, r.output
    r = cli("rank", "evaluate", "--run", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "hit@3/save" in r.stdout and (tmp_path / "run" / "eval" / "ranking-test.json").exists()
    rep = json.loads((tmp_path / "run" / "eval" / "ranking-test.json").read_text())
    assert rep["data"]["fingerprint"] == RankData(rank).manifest.fingerprint and rep["requests"] == USERS * 2 * 2
    # one request scored: per-head scores with the served order
    ds = Dataset.open(planted_rank / "ds")
    uid = ds.users["user_id"][0]
    items = ds.items["item_id"].to_list()[:5]
    t = str(int(RankData(rank).request_t.max()))
    r = cli("rank", "score", "--run", tmp_path / "run", "--user", uid, "--time", t, "--items",
            ",".join(map(str, items)))
    assert r.exit_code == 0, r.output
    assert "save" in r.stdout and "utility" in r.stdout
    many = ds.items["item_id"].to_list()[:12]  # more than a table's default 10 rows: every candidate is printed
    r = cli("rank", "score", "--run", tmp_path / "run", "--user", uid, "--time", t, "--items", ",".join(map(str, many)))
    assert r.exit_code == 0 and "…" not in r.stdout and all(f" {i} " in r.stdout for i in many[:12]), r.stdout
    r = cli("rank", "score", "--run", tmp_path / "run", "--user", uid, "--time", t, "--items", ",".join(map(str, many)),
            "--json")
    scored = json.loads(r.stdout)
    assert [x["item_id"] for x in scored] != [] and sorted(x["item_id"] for x in scored) == sorted(map(str, many))
    assert [x["utility"] for x in scored] == sorted((x["utility"] for x in scored), reverse=True)
    # bad input: each a message, exit code 2, no traceback
    bad = [
        (("rank", "score", "--run", tmp_path / "run", "--user", uid, "--time", t, "--items", ""),
         "a request needs at least one candidate"),
        (("rank", "score", "--run", tmp_path / "run", "--user", uid, "--time", t, "--items", "nope"),
         "unknown item id(s) 'nope'"),
        (("rank", "score", "--run", tmp_path / "run", "--user", "nobody", "--time", t, "--items", items[0]),
         "no such user"),
        (("rank", "score", "--run", tmp_path / "run", "--user", uid, "--time", t, "--items", items[0], "--surface",
          "home"), "--surface 'home': unknown surface (this dataset records none)"),
        (("rank", "prepare", "--dataset", planted_rank / "ds", "--output", tmp_path / "r2", "--heads", "save=repin"),
         "head 'save' names unknown action(s) 'repin'"),
        (("rank", "prepare", "--dataset", planted_rank / "ds", "--output", tmp_path / "r2"),
         "no default ranking heads for format 'events'"),
        (("rank", "prepare", "--dataset", planted_rank / "ds", "--output", tmp_path / "r2", "--heads", "save=save",
          "--item-vectors", "interests"), "no item of"),
        (("rank", "prepare", "--dataset", planted_rank / "ds", "--output", tmp_path / "r2", "--heads", "save=save",
          "--item-vectors", "pinsage"), "unknown item vectors 'pinsage' (expected one of: auto, content"),
        (("rank", "train", "--data", planted_rank / "ds", "--output", tmp_path / "r3"), "not ranking data"),
        (("rank", "evaluate", "--run", planted_rank / "pf"), "is a retrieval run, not a ranking run"),
    ]
    for args, message in bad:
        r = cli(*args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
        assert "Traceback" not in r.output


def test_leaky_pinnerformer_runs_and_order_only_data_are_refused(planted_rank, cli, tmp_path):
    # a PinnerFormer trained on every event (no eval.until) has seen the validation and test periods
    from pinnerformer.training.config import load_config
    from pinnerformer.training.retrieval import retrieval_loop

    ds = Dataset.open(planted_rank / "ds")
    cfg = load_config("small", overrides=json.loads(json.dumps({**TINY, "optim": {**TINY["optim"], "max_epochs": 1}})))
    retrieval_loop(ds, cfg, tmp_path / "leaky", log=lambda s: None).fit(progress=False, max_steps=2)
    r = cli("rank", "prepare", "--dataset", planted_rank / "ds", "--output", tmp_path / "r", "--heads", "save=save",
            "--request", "session", "--pinnerformer", tmp_path / "leaky")
    assert r.exit_code == 2 and "beyond the period a feature model may see" in r.stderr and "(leakage)" in r.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written
    # trained a day too long
    late = RankData(planted_rank / "rank").manifest.feature_end + DAY
    cfg = load_config("small", overrides=json.loads(json.dumps(
        {**TINY, "eval": {"until": late, "test_fraction": 0.0}, "optim": {**TINY["optim"], "max_epochs": 1}})))
    retrieval_loop(ds, cfg, tmp_path / "late", log=lambda s: None).fit(progress=False, max_steps=2)
    r = cli("rank", "prepare", "--dataset", planted_rank / "ds", "--output", tmp_path / "r", "--heads", "save=save",
            "--request", "session", "--pinnerformer", tmp_path / "late")
    assert r.exit_code == 2 and "after the period a feature model may see ends" in r.stderr
    # order-only data: no times for the requests, the sequences or the time-window mask
    (tmp_path / "seq.txt").write_text("u1 a b c d\nu2 b c d e\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "seq.txt", "-o", tmp_path / "sq").exit_code == 0
    r = cli("rank", "prepare", "--dataset", tmp_path / "sq", "--output", tmp_path / "r", "--heads", "x=interact")
    assert r.exit_code == 2 and "no timestamps (order-only clock)" in r.stderr, r.output
    # requests with a single candidate only: nothing to rank
    pl.DataFrame({"user": [1, 1, 2], "item": [1, 2, 3], "action": ["save"] * 3,
                  "timestamp": [1_600_000_000, 1_600_100_000, 1_600_200_000]}).write_csv(tmp_path / "one.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "one.csv", "-o", tmp_path / "one",
               "--action-col", "action", "--positive", "save").exit_code == 0
    r = cli("rank", "prepare", "--dataset", tmp_path / "one", "--output", tmp_path / "r", "--heads", "save=save")
    assert r.exit_code == 2 and "no day request has at least 2 candidates" in r.stderr, r.output


def test_rank_score_takes_yesterdays_snapshot_of_the_same_model_only(planted_rank, cli, tmp_path):
    """The snapshot of the day before gives the same scores as the vector computed as of the request's day; a
    snapshot of the request's day (leakage) or made by another PinnerFormer is refused."""
    import datetime as dt

    from pinnerformer.data.clock import utc_day
    from pinnerformer.ranking.score import score_request
    from pinnerformer.training.ranking import load_rank_config, ranking_loop

    rd = RankData(planted_rank / "rank")
    run = tmp_path / "run"
    ranking_loop(rd, load_rank_config("default", overrides=json.loads(json.dumps(RANK_TINY))), run,
                 log=lambda s: None).fit(progress=False, max_steps=5)
    ds = Dataset.open(planted_rank / "ds")
    r = int(rd.requests_in("test")[-1])
    uid = str(ds.users["user_id"][int(rd.request_user[r])])
    t = int(rd.request_t[r])
    items = [str(ds.items["item_id"][int(i)]) for i in rd.cand_item[rd.cand_start[r]:rd.cand_start[r + 1]]]
    day = utc_day(t)
    for as_of, root in ((day - dt.timedelta(days=1), "yesterday"), (day, "today")):
        res = cli("embed", "--run", planted_rank / "pf", "--dataset", planted_rank / "ds", "--as-of", as_of.isoformat(),
                  "--output", tmp_path / root)
        assert res.exit_code == 0, res.output
    computed = score_request(run, uid, str(t), items)
    yesterday = (day - dt.timedelta(days=1)).isoformat()
    from_snapshot = score_request(run, uid, str(t), items, tmp_path / "yesterday" / yesterday)
    assert from_snapshot["item_id"].to_list() == computed["item_id"].to_list()
    assert np.allclose(from_snapshot["save"].to_numpy(), computed["save"].to_numpy(), atol=1e-5)
    res = cli("rank", "score", "--run", run, "--user", uid, "--time", str(t), "--items", ",".join(items),
              "--snapshot", tmp_path / "today" / day.isoformat())
    assert res.exit_code == 2 and "not before the request's day" in res.stderr and "(leakage)" in res.stderr
    # a snapshot made by another PinnerFormer (same data, another seed)
    from pinnerformer.training.config import load_config
    from pinnerformer.training.retrieval import retrieval_loop

    cfg = load_config("small", overrides=json.loads(json.dumps(
        {**TINY, "seed": 7, "eval": {"until": rd.manifest.pf_until, "test_fraction": 0.0},
         "optim": {**TINY["optim"], "max_epochs": 1}})))
    retrieval_loop(ds, cfg, tmp_path / "other-pf", log=lambda s: None).fit(progress=False, max_steps=2)
    assert cli("embed", "--run", tmp_path / "other-pf", "--dataset", planted_rank / "ds", "--as-of", yesterday,
               "--output", tmp_path / "other").exit_code == 0
    res = cli("rank", "score", "--run", run, "--user", uid, "--time", str(t), "--items", ",".join(items),
              "--snapshot", tmp_path / "other" / yesterday)
    assert res.exit_code == 2 and "made by another PinnerFormer model" in res.stderr


def test_a_requests_surface_is_its_first_actions_and_sessions_across_a_cut_off_are_left_out(cli, tmp_path):
    """Found in review: the request's surface was the most common one of all its events (its engagements included,
    and a tie decided by hash order), and a session running past midnight at a cut-off kept the next period's
    labels."""
    rows = []
    day0 = 1_600_041_600  # a UTC midnight
    for d in range(10):
        for u in range(6):
            t = day0 + d * 86400 + 3600 * (1 + u)
            # viewed on home, then saved twice on board: the surface known when the request starts is home
            rows += [(u, 10 * u + d % 3, "view", "home", t), (u, 100 + u, "save", "board", t + 60),
                     (u, 200 + u, "save", "board", t + 120)]
        # one session from 23:55 to 00:05, every day (so across each cut-off)
        t = day0 + d * 86400 + 86100
        rows += [(9, 300 + d, "view", "home", t), (9, 400 + d, "save", "home", t + 600)]
    pl.DataFrame(rows, schema=["user", "item", "action", "surface", "timestamp"], orient="row").write_csv(
        tmp_path / "log.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--surface-col", "surface", "--positive", "save").exit_code == 0
    ds = Dataset.open(tmp_path / "ds")
    tables = build_requests(ds, RequestOptions(request="session", heads=parse_heads("save=save",
                                                                                     ds.manifest.action_names())))
    home = ds.manifest.surfaces.index("home")
    req = tables.requests
    assert (req.filter(pl.col("user") != ds.users["user_id"].cast(pl.String).to_list().index("9"))["surface"]
            == home).all()
    bounds = [b for b in (tables.feature_end, tables.train_end, tables.val_end) if b is not None]
    assert tables.skipped["requests_across_a_split_boundary"] == len(bounds)  # user 9's sessions at the 3 cut-offs
    assert req.height == 10 * 6 + 10 - len(bounds)


def test_within_session_requests_start_at_the_sessions_middle_action_and_its_first_half_is_the_sequence(cli, tmp_path):
    """`within-session`: a session's actions before its middle one are the realtime signal (in the sequence, not
    candidates); the request is scored at the middle action, and its candidates and labels come from there on."""
    rows = []
    day0 = 1_600_041_600  # a UTC midnight
    items = [0, 1, 2, 3, 1, 4, 5, 2]  # viewed 0-3; then 1 saved, 4 and 5 viewed, 2 saved
    actions = ["view"] * 4 + ["save", "view", "view", "save"]
    for d in range(10):
        for u in range(6):
            t = day0 + d * 86400 + 3600 * (1 + u)
            rows += [(u, 10 * u + i, a, t + 60 * k) for k, (i, a) in enumerate(zip(items, actions))]
    pl.DataFrame(rows, schema=["user", "item", "action", "timestamp"], orient="row").write_csv(tmp_path / "log.csv")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
               "action", "--positive", "save").exit_code == 0
    ds = Dataset.open(tmp_path / "ds")
    heads = parse_heads("save=save", ds.manifest.action_names())
    whole = build_requests(ds, RequestOptions(request="session", heads=heads))
    within = build_requests(ds, RequestOptions(request="within-session", heads=heads))
    assert whole.requests.height == within.requests.height == 60 and within.skipped == {}
    assert (within.requests["t"] - whole.requests["t"] == 4 * 60).all()  # the middle (5th) of 8 actions
    item_ids = ds.items["item_id"].cast(pl.Int64).to_numpy()
    user_ids = ds.users["user_id"].cast(pl.Int64).to_numpy()
    ts = np.asarray(ds.timelines.ts)
    for r in within.requests.iter_rows(named=True):
        c = within.candidates.filter(pl.col("request") == r["request"])
        u = int(user_ids[r["user"]])
        assert dict(zip((item_ids[c["item"].to_numpy()] - 10 * u).tolist(), c["y_save"].to_list())) == {
            1: 1, 4: 0, 5: 0, 2: 1}
        assert ts[r["seq_end"] - 1] == r["t"] - 60 and ts[r["seq_end"]] == r["t"]  # the first half is before it
    assert sorted(whole.candidates.group_by("request").len()["len"].unique().to_list()) == [6]


def test_the_int8_item_table_is_stored_checked_and_its_faults_named(planted_rank, cli, tmp_path):
    """rank prepare stores TransAct V2's int8 table with its scale and zero point; a table that is missing or
    changed, a scale or zero point inconsistent with the recorded range, or ranking data without a table, each
    stop `rank train --model transact-v2` with a message naming the file or the field (exit 2, no traceback)."""
    import shutil

    from pinnerformer.ops.quantize import int8_table
    from pinnerformer.training.ranking import stored_int8_table

    rd = RankData(planted_rank / "rank")
    info = rd.manifest.int8_table
    stored = stored_int8_table(rd)
    expect = int8_table(np.array(rd.item_vectors), 64)
    assert isinstance(stored.q, np.memmap) and np.array_equal(stored.q, expect.q)
    assert info.shape == (len(rd.item_vectors), 16) and (info.scale, info.zero) == (expect.scale, expect.zero)

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(planted_rank / "rank", d)
        change(d)
        return d

    def edit_manifest(**fields):
        def change(d):
            raw = json.loads((d / "manifest.json").read_text())
            raw["int8_table"] = None if fields.get("drop") else {**raw["int8_table"], **fields}
            (d / "manifest.json").write_text(json.dumps(raw))
        return change

    def flip_byte(d):
        q = np.load(d / "item_vectors_int8.npy")
        q[0, 0] = q[0, 0] + 1 if q[0, 0] < 127 else 126
        np.save(d / "item_vectors_int8.npy", q)

    cases = [
        (broken("scale", edit_manifest(scale=info.scale * 2)),
         f"int8_table: the quantisation scale {info.scale * 2} / zero point {info.zero} is inconsistent"),
        (broken("zero", edit_manifest(zero=info.zero + 3)), "is inconsistent with the stored vectors' range"),
        (broken("missing", lambda d: (d / "item_vectors_int8.npy").unlink()), "int8 item table named in"),
        (broken("changed", flip_byte), "the int8 item table changed since it was written"),
        (broken("none", edit_manifest(drop=True)), "has no int8 item table (prepared by a version before"),
    ]
    for d, message in cases:
        r = cli("rank", "train", "--data", d, "--output", tmp_path / f"run-{d.name}", "--model", "transact-v2",
                "--max-steps", "1", "--no-progress")
        assert r.exit_code == 2 and message in r.stderr, (d.name, r.output)
        assert "Traceback" not in r.output


# ---- the time split by dates, thinning of training requests only, --min-candidates, item vectors of `auto` --------

SIZED_DAY0 = 1_600_041_600  # 2020-09-14, a UTC midnight


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """10 days of one day-request per user (80 users) of 1 + (user + day) % 10 distinct items, the first saved, the
    others viewed (so every size from 1 to 10 in every period); items in 5 categories. Returns (dir, log)."""
    from tests.conftest import run_cli

    d = tmp_path_factory.mktemp("sized")
    rows = []
    for day in range(10):
        for u in range(80):
            t = SIZED_DAY0 + day * DAY + 3600 * (1 + u % 12)
            rows += [(u, (7 * u + 3 * day + k) % 50, "view" if k else "save", t + 60 * k)
                     for k in range(1 + (u + day) % 10)]
    log = pl.DataFrame(rows, schema=["user", "item", "action", "timestamp"], orient="row")
    log.write_csv(d / "log.csv")
    pl.DataFrame({"item": range(50), "interests": [f"g{i % 5}" for i in range(50)]}).write_csv(d / "items.csv")
    r = run_cli("data", "prepare", "-f", "events", "-i", d / "log.csv", "-o", d / "ds", "--action-col", "action",
                "--positive", "view,save", "--items", d / "items.csv", "--items-interests-col", "interests")
    assert r.exit_code == 0, r.output
    return d, log


def _requests_of(log: pl.DataFrame) -> pl.DataFrame:
    """The day requests counted straight from the log: (user, day) -> first time, distinct items."""
    return log.group_by("user", pl.col("timestamp") // DAY).agg(pl.col("timestamp").min().alias("t"),
                                                                 pl.col("item").n_unique().cast(pl.Int64).alias("n"))


def test_a_date_split_gives_exactly_those_days_periods_and_only_training_requests_are_thinned(sized):
    import datetime as dt

    from pinnerformer.data.clock import day_end_ts

    d, log = sized
    ds = Dataset.open(d / "ds")
    dates = (dt.date(2020, 9, 19), dt.date(2020, 9, 21))
    opts = RequestOptions(heads=parse_heads("save=save", ds.manifest.action_names()), split_dates=dates,
                          min_candidates=3, max_candidates=5)
    assert opts.split is None and opts.split_text == "2020-09-19,2020-09-21"
    tables = build_requests(ds, opts, log=lambda s: None)
    # the cut-offs: the UTC midnights ending 2020-09-19 and 2020-09-21; periods counted from the log's own times
    assert (tables.train_end, tables.val_end) == (day_end_ts(dates[0]), day_end_ts(dates[1]))
    direct = _requests_of(log).filter(pl.col("n") >= 3)
    t = direct["t"].to_numpy()
    split = tables.requests["split"].to_numpy()
    assert ((split == 0) | (split == 3)).sum() == (t < tables.train_end).sum() == 6 * 64
    assert (split == 1).sum() == ((t >= tables.train_end) & (t < tables.val_end)).sum() == 2 * 64
    assert (split == 2).sum() == (t >= tables.val_end).sum() == 2 * 64
    # the feature period: the first half of the training days
    assert (split == 3).sum() == (t < tables.feature_end).sum() == 3 * 64
    # feature and training requests over 5 candidates keep 5; validation and test requests keep every candidate
    sizes = tables.candidates.group_by("request").len().sort("request")["len"].to_numpy()
    got = tables.requests.select("user", (pl.col("t") // DAY).alias("timestamp"), "split").with_columns(size=sizes)
    both = got.join(direct.with_columns(pl.col("timestamp")), on=["user", "timestamp"])
    assert both.height == len(direct)
    training = both["split"].is_in([0, 3])
    assert (both.filter(training)["size"] == both.filter(training)["n"].clip(upper_bound=5)).all()
    assert (both.filter(~training)["size"] == both.filter(~training)["n"]).all()
    assert both.filter(~training)["size"].max() == 10
    beyond = int((both.filter(training)["n"] - 5).clip(lower_bound=0).sum())
    assert tables.skipped == {"requests_with_fewer_than_3_candidates": 2 * 8 * 10,
                              "candidates_beyond_5_per_request": beyond} and beyond == 6 * 8 * (1 + 2 + 3 + 4 + 5)


def test_min_candidates_skips_exactly_the_smaller_requests(sized):
    d, log = sized
    ds = Dataset.open(d / "ds")
    heads = parse_heads("save=save", ds.manifest.action_names())
    for m in (2, 4, 7):
        tables = build_requests(ds, RequestOptions(heads=heads, min_candidates=m, max_candidates=10),
                                log=lambda s: None)
        n = _requests_of(log)["n"]
        assert tables.skipped == {f"requests_with_fewer_than_{m}_candidates": int((n < m).sum())}
        assert tables.requests.height == int((n >= m).sum())
    assert RequestOptions(heads=heads).split == (0.7, 0.15, 0.15)  # the default split is unchanged


def test_the_feature_pinnerformers_weakness_is_judged_from_its_validation_summary():
    from pinnerformer.ranking.prepare import pinnerformer_weakness
    from pinnerformer.training.run_files import TrainSummary

    def summary(best, popularity):
        return TrainSummary(stopped_by="max_steps", best_epoch=0, metric="recall@10", best=best,
                            popularity=popularity, steps=5, wall_s=1.0)

    assert pinnerformer_weakness(summary(0.2, 0.1)) is None
    assert pinnerformer_weakness(summary(0.2, None)) is None
    assert pinnerformer_weakness(summary(0.0, None)) == "its validation recall@10 is 0.0000"
    assert pinnerformer_weakness(summary(0.1, 0.1)) == ("its validation recall@10 0.1000 is not above the popularity "
                                                        "baseline's 0.1000")
    assert "never defined" in pinnerformer_weakness(summary(None, 0.1))
    assert "no training summary" in pinnerformer_weakness(None)


def test_auto_item_vectors_pass_over_a_weak_pinnerformer_only_for_categories():
    from types import SimpleNamespace

    from pinnerformer.ranking.prepare import frozen_item_vectors, interest_vectors

    def data(interests, content=None):
        return SimpleNamespace(path="DS", content_vectors=lambda: content,
                               items=pl.DataFrame({"interests": interests}, schema={"interests": pl.List(pl.String)}))

    pf, weak, logged = np.ones((3, 4), np.float32), "its validation recall@10 is 0.0000", []
    v, rec = frozen_item_vectors(data([["a"], [], ["b"]]), "auto", pf, weak, log=logged.append)
    assert np.array_equal(v, interest_vectors([["a"], [], ["b"]])) and rec["source"] == "interests"
    assert rec["why"].endswith(f"{weak}: --item-vectors auto fell back to interests") and logged[-1].startswith("warn")
    v, rec = frozen_item_vectors(data([[], [], []]), "auto", pf, weak, log=logged.append)  # nothing to fall back to
    assert v is pf and rec["source"] == "pinnerformer" and "no item has an interest" in rec["warning"]
    v, rec = frozen_item_vectors(data([["a"], [], ["b"]]), "pinnerformer", pf, weak, log=logged.append)
    assert v is pf and rec["warning"].endswith(weak) and len(logged) == 3
    content = np.zeros((3, 8), np.float32)
    for kind, weakness, source in [("auto", weak, "content"), ("auto", None, "pinnerformer"),
                                   ("interests", weak, "interests")]:
        v, rec = frozen_item_vectors(data([["a"], [], ["b"]], content if source == "content" else None), kind, pf,
                                     weakness, log=logged.append)
        assert rec == {"source": source, "dim": v.shape[1], "requested": kind} and len(logged) == 3


def test_rank_prepare_by_dates_falls_back_from_a_useless_pinnerformer_to_interests(sized, cli, tmp_path,
                                                                                    monkeypatch):
    """`--item-vectors auto` on data without content vectors, behind a PinnerFormer whose validation recall is 0:
    interests, a warning, and the choice and its reason in the manifest; `--item-vectors pinnerformer` keeps that
    model's vectors, with the warning. Also: --split dates, --min-candidates and --max-candidates on the CLI."""
    from pinnerformer.ranking.evaluate import protocol_text
    from pinnerformer.runs import RunDir
    from pinnerformer.training.run_files import TrainSummary

    d, log = sized
    useless = TrainSummary(stopped_by="max_steps", best_epoch=0, metric="recall@10", best=0.0, popularity=0.05,
                           steps=2, wall_s=1.0)
    monkeypatch.setattr(RunDir, "summary", lambda self: useless)
    args = ("rank", "prepare", "--dataset", d / "ds", "--heads", "save=save", "--split", "2020-09-19,2020-09-21",
            "--min-candidates", "3", "--max-candidates", "5")
    r = cli(*args, "--output", tmp_path / "auto", "--pf-max-steps", "2")
    assert r.exit_code == 0, r.output
    assert "warning: the feature PinnerFormer learned too little" in r.stderr and "fell back to interests" in r.stderr
    rd = RankData(tmp_path / "auto")
    m = rd.manifest
    assert m.item_vectors["source"] == "interests" and m.item_vectors["requested"] == "auto"
    assert "its validation recall@10 is 0.0000" in m.item_vectors["why"] and any("fell back" in n for n in m.notes)
    assert len(np.unique(np.asarray(rd.item_vectors), axis=0)) == 5  # one vector per category
    assert m.pinnerformer["validation"] == {"metric": "recall@10", "best": 0.0, "popularity": 0.05}
    assert m.options.split is None and [str(x) for x in m.options.split_dates] == ["2020-09-19", "2020-09-21"]
    assert m.skipped["requests_with_fewer_than_3_candidates"] == 160 and m.thinned_periods == ["feature", "train"]
    assert (m.splits["validation"].requests, m.splits["test"].requests) == (128, 128)
    assert np.diff(rd.cand_start)[rd.requests_in("test")].max() == 10
    protocol = protocol_text(rd, 3)
    assert "(--split 2020-09-19,2020-09-21)" in protocol and "validation and test ones whole" in protocol
    assert "train < 2020-09-20 <= validation < 2020-09-22 <= test" in protocol
    # asked for by name: PinnerFormer's vectors, with the warning (the same run, not trained again)
    r = cli(*args, "--output", tmp_path / "pf", "--item-vectors", "pinnerformer", "--pinnerformer",
            tmp_path / "auto" / "pinnerformer")
    assert r.exit_code == 0, r.output
    assert "warning: the feature PinnerFormer learned too little" in r.stderr
    m = RankData(tmp_path / "pf").manifest
    assert m.item_vectors["source"] == "pinnerformer" and "recall@10 is 0.0000" in m.item_vectors["warning"]


def test_a_narrowed_sequence_output_scores_the_same_request_by_request(planted_rank):
    """model.sequence_dim projects TransAct's (K + 1)·d outputs to a narrow width before the features: the input
    width shrinks by exactly that, and the serving form (the sequence's projection once per request) scores as the
    plain form does."""
    from pinnerformer.models.ranker import RankerConfig
    from pinnerformer.training.ranking import ranker_for

    rd = RankData(planted_rank / "rank")
    m = rd.dataset().manifest
    cfg = RankerConfig(transact={"seq_len": 16}, features=False)
    wide = ranker_for(rd, cfg, len(m.actions), len(m.surfaces))
    torch.manual_seed(0)
    narrow = ranker_for(rd, cfg.model_copy(update={"sequence_dim": 8}), len(m.actions), len(m.surfaces))
    assert narrow.x0_dim == wide.x0_dim - wide.transact.out_dim + 8
    narrow.eval()
    b = build_rank_batch(rd, rd.dataset().timelines, rd.requests_in("test")[:6], 16)
    with torch.no_grad():
        plain, shared = narrow(b), narrow(b, shared_projection=True)
    assert plain.shape == (b.n_rows, len(rd.heads))
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_the_piecewise_linear_encoding_is_its_definition_with_the_training_rows_quantiles_as_edges(planted_rank):
    """model.feature_bins: each point-in-time feature also enters as how far it is through each of T quantile bins
    of the training rows (a plain loop is the reference); the edges are saved with the model, so a reloaded ranker
    scores the same."""
    from pinnerformer.models.ranker import RankerConfig, piecewise_linear
    from pinnerformer.training.ranking import ranker_for

    x = torch.tensor([[-1.0, 0.0], [0.5, 0.0], [2.5, 0.5], [9.0, 3.0]])
    edges = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])  # the second feature: two empty bins
    want = torch.zeros(4, 2, 3)
    for n in range(4):
        for f in range(2):
            for t in range(3):
                lo, hi, v = float(edges[f, t]), float(edges[f, t + 1]), float(x[n, f])
                want[n, f, t] = min(max((v - lo) / (hi - lo), 0.0), 1.0) if hi > lo else float(v > lo)
    torch.testing.assert_close(piecewise_linear(x, edges), want)

    rd = RankData(planted_rank / "rank")
    m = rd.dataset().manifest
    cfg = RankerConfig(sequence="none", feature_bins=4)
    plain = ranker_for(rd, cfg.model_copy(update={"feature_bins": 0}), len(m.actions), len(m.surfaces), (), None)
    binned = ranker_for(rd, cfg, len(m.actions), len(m.surfaces), (), None)
    F = len(binned.inputs.feature_names)
    assert F > 0 and binned.x0_dim == plain.x0_dim + 4 * F
    values = np.random.default_rng(0).gamma(1.0, 2.0, (500, F))
    binned.set_feature_scale(values)
    np.testing.assert_allclose(binned.feature_edges.numpy(), np.quantile(values, [0, .25, .5, .75, 1], axis=0).T,
                               rtol=1e-6)
    again = ranker_for(rd, cfg, len(m.actions), len(m.surfaces), (), None)
    again.load_state_dict(binned.state_dict())
    every_row = np.random.default_rng(1).gamma(1.0, 2.0, (len(rd.cand_item), F)).astype(np.float32)
    b = build_rank_batch(rd, rd.dataset().timelines, rd.requests_in("test")[:4], 16, features=every_row)
    binned.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(b), binned(b))


def test_listwise_training_takes_whole_requests_and_adds_exactly_the_listwise_term(planted_rank):
    """loss.listwise > 0: a training batch holds every training row of each of its requests, and the step's loss is
    the pointwise BCE plus listwise x the requests' softmax loss (same weights, same batch)."""
    from pinnerformer.objectives.request_softmax import request_softmax
    from pinnerformer.training.ranking import RankingTask, load_rank_config

    rd = RankData(planted_rank / "rank")
    over = {**RANK_TINY, "model": {**RANK_TINY["model"], "sequence": "none"}}
    plain = RankingTask(rd, load_rank_config("default", overrides=json.loads(json.dumps(over))))
    listwise = RankingTask(rd, load_rank_config("default", overrides=json.loads(json.dumps(
        {**over, "loss": {"listwise": 0.5}}))))
    listwise.model.load_state_dict(plain.model.state_dict())
    plain.model.eval(), listwise.model.eval()
    b = listwise.host_batch(0, 1)
    order = listwise._order[1]
    rows = order.rows[order.start[1]:order.start[2]]
    assert b.n_rows == len(rows) and len(np.unique(rd.cand_request[rows])) > 1
    for r in np.unique(rd.cand_request[rows]):  # whole requests
        assert set(rows[rd.cand_request[rows] == r]) == set(plain.rows[rd.cand_request[plain.rows] == r])
    with torch.no_grad():
        got = listwise.loss(b, 0, torch.device("cpu")).loss
        base = plain.loss(b, 0, torch.device("cpu")).loss
        term = request_softmax(plain.model(b), b.labels, b.row_request)
    assert term > 0
    torch.testing.assert_close(got, base + 0.5 * term)


def test_a_run_from_before_low_rank_cross_layers_loads_with_its_full_rank_layers(planted_rank, tmp_path):
    """Runs written before `model.cross_rank` existed have no such field: they load as they were trained (full rank),
    not with today's default, whose layers would not fit their weights."""
    import shutil

    from pinnerformer.ranking.run import RankRun
    from pinnerformer.training.ranking import load_rank_config, ranking_loop
    from pinnerformer.training.run_files import CONFIG

    rd = RankData(planted_rank / "rank")
    cfg = load_rank_config("default", overrides={**RANK_TINY, "model": {**RANK_TINY["model"], "cross_rank": 0}})
    run = tmp_path / "old"
    ranking_loop(rd, cfg, run, log=lambda s: None).fit(max_steps=3, progress=False)
    raw = json.loads((run / CONFIG).read_text())
    assert raw["config"]["model"].pop("cross_rank") == 0
    (run / CONFIG).write_text(json.dumps(raw))
    model = RankRun(run).load_model(rd, "last")
    assert isinstance(model.cross.layers[0], torch.nn.Linear) and model.cross.layers[0].weight.shape[0] == model.x0_dim
    new = tmp_path / "new"
    shutil.copytree(run, new)
    raw["config"]["model"]["cross_rank"] = 64  # today's default: low rank, which the old weights do not fit
    (new / CONFIG).write_text(json.dumps(raw))
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        RankRun(new).load_model(rd, "last")


def test_rank_experiment_puts_the_trees_beside_every_table(planted_rank, tmp_path):
    """`rank experiment` trains gradient-boosted trees on the same features once and shows them in every table: a
    row, a lift table over them with the report's own bootstrap draws (so the lift of a model over the trees and
    the trees' over it are inverse ratios), the baselines' lifts over them; a second call reuses every run."""
    from pinnerformer.ranking.experiment import run_experiment
    from pinnerformer.training import run_files as rf

    over = {**RANK_TINY, "gbdt": {"min_data_in_leaf": 20, "max_rounds": 30}}
    logs: list[str] = []
    readme = run_experiment(planted_rank / "rank", tmp_path / "x", preset="default", tables=["table2"], max_steps=3,
                            overrides=over, log=logs.append)
    text = readme.read_text()
    assert "| gbdt (trees, same features) |" in text and text.count("Lift over `gbdt`") == 2  # table2, baselines
    assert text.count("Lift over `no-sequence`") == 1  # the baselines' section has no empty table of lifts
    assert (tmp_path / "x" / "runs" / "gbdt" / rf.SUMMARY).exists()
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    trees = json.loads((tmp_path / "x" / "lifts_over_trees.json").read_text())
    assert set(trees) == set(report["models"]) - {"gbdt"}
    for name in ("transact", "no-pinnerformer", "random"):
        assert set(trees[name]) == set(report["lifts"]["transact"])  # every HIT@3 and grouped-AUC key
        for key, lift in trees[name].items():
            assert lift["ci95"][0] <= lift["lift"] <= lift["ci95"][1]
    # no-sequence is the report's reference: its lift over the trees inverts the trees' lift over it
    for key, lift in trees["no-sequence"].items():
        assert (1 + lift["lift"]) * (1 + report["lifts"]["gbdt"][key]["lift"]) == pytest.approx(1.0, abs=1e-9)
    assert (tmp_path / "x" / "table2.png").stat().st_size > 0
    logs.clear()
    run_experiment(planted_rank / "rank", tmp_path / "x", preset="default", tables=["table2"], max_steps=3,
                   overrides=over, log=logs.append)
    assert sum("already trained" in line for line in logs) == 4  # no-sequence, gbdt, transact, no-pinnerformer
