"""`pinnerformer serve` over a small work directory (planted requests: a retrieval run, its snapshot and FAISS
index, a ranker with its own feature PinnerFormer), on both stores (embedded LMDB and a real Redis): the same scores
as `rank score` for the same inputs; an event posted is in the user's realtime sequence at the next call and moves
the scores; recommendations leave out what the user did and name their source (retrieval, similar items for a new
user with events, popular for one without); the token, 422s naming the field, 400/404 naming the unknown thing,
limits; micro-batched concurrent requests score as they would alone; a hand-over while requests run fails none
and mixes no versions; the CLI's messages."""

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest

from tests.conftest import TINY, run_cli

TOKEN = "test-token-0123456789abcdef"
FUZZ_EXAMPLES = int(os.environ.get("PINNERFORMER_FUZZ_EXAMPLES", "0"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return build_workdir(tmp_path_factory.mktemp("served"))


def build_workdir(d, log: pl.DataFrame | None = None, prepare_args: tuple = (), item_number=None):
    """A servable work directory in `d`, laid out as the quickstart's: dataset/, run/, snapshots/, index/,
    rank-data/, rank-run/ (tiny models on planted requests: `log`, default `planted_request_log`, prepared with
    `prepare_args`; `item_number` maps the item id column to the planted item numbers)."""
    import datetime as dt

    from pinnerformer.data.dataset import Dataset, set_content_vectors
    from pinnerformer.data.requests import RankData, RequestOptions, parse_heads
    from pinnerformer.data.synthetic import planted_request_log
    from pinnerformer.inference.daily_embed import DailyJob
    from pinnerformer.ranking.prepare import prepare_ranking
    from pinnerformer.retrieval.index import build_item_index
    from pinnerformer.training.config import load_config
    from pinnerformer.training.ranking import load_rank_config, ranking_loop
    from pinnerformer.training.retrieval import retrieval_loop

    (planted_request_log(n_users=80, days=10) if log is None else log).write_csv(d / "log.csv")
    r = run_cli("data", "prepare", "-f", "events", "-i", d / "log.csv", "-o", d / "dataset", "--action-col",
                "action", "--positive", "click,save", *prepare_args)
    assert r.exit_code == 0, r.output
    item_ids = Dataset.open(d / "dataset").items["item_id"]
    ids = (item_ids.cast(pl.Int64) if item_number is None else item_number(item_ids)).to_numpy()
    vec = np.eye(16, dtype=np.float32)[ids % 10] + np.random.default_rng(0).normal(0, 0.1, (len(ids), 16))
    set_content_vectors(d / "dataset", vec, "planted-groups")
    ds = Dataset.open(d / "dataset")
    cfg = load_config("small", overrides=json.loads(json.dumps({**TINY, "optim": {**TINY["optim"],
                                                                                   "max_epochs": 1}})))
    retrieval_loop(ds, cfg, d / "run", log=lambda s: None).fit(progress=False, max_steps=5)
    last = dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc).date()
    DailyJob(d / "run", ds, last, d / "snapshots").run(log=lambda s: None)
    build_item_index(d / "run", ds, d / "index", "flat", log=lambda s: None)
    opts = RequestOptions(request="session", heads=parse_heads("save=save; click=click,save",
                                                               ds.manifest.action_names()))
    prepare_ranking(d / "dataset", d / "rank-data", opts, pf_max_steps=5, log=lambda s: None)
    over = {"device": "cpu", "optim": {"batch_size": 128, "lr": 3e-3, "warmup_steps": 5, "max_epochs": 1},
            "data": {"epoch_rows": 1000, "max_val_requests": 50},
            "model": {"transact": {"seq_len": 16}, "mlp": [32], "item_id_dim": 4,
                      "user_id_dim": 4}}
    ranking_loop(RankData(d / "rank-data"), load_rank_config("default", overrides=over), d / "rank-run",
                 log=lambda s: None).fit(progress=False, max_steps=5)
    return d


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


@pytest.fixture(params=["lmdb", "redis"])
def served(request, workdir, tmp_path):
    """(TestClient, Service) over a fresh store of either backend."""
    from fastapi.testclient import TestClient

    from pinnerformer.serving.app import ServiceSettings, create_app
    from pinnerformer.serving.server import build_service

    store = str(tmp_path / "store") if request.param == "lmdb" else request.getfixturevalue("redis_url")
    if request.param == "redis":
        import redis

        redis.Redis.from_url(store).flushdb()
    service = build_service(workdir, store, TOKEN, ServiceSettings(batch_wait_ms=20, max_events=50),
                            log=lambda s: None)
    with TestClient(create_app(service)) as client:
        yield client, service
    service.store.close()


def later(service, hours=1):
    from pinnerformer.serving.engine import version_end

    return version_end(service.state[1]) + hours * 3600


def test_rank_gives_the_scores_of_rank_score_for_the_same_inputs(served, workdir):
    from pinnerformer.ranking.score import score_request

    client, service = served
    b = service.bundle
    t = later(service)
    for user in (b.user_ids[3], b.user_ids[40]):
        items = b.item_ids[5:17]
        r = client.post("/v1/rank", json={"user": user, "items": items, "time": t}, headers=AUTH)
        assert r.status_code == 200, r.text
        got = {x["item"]: x["heads"] for x in r.json()["items"]}
        ref = score_request(workdir / "rank-run", user, str(t), items)
        for row in ref.iter_rows(named=True):
            for h in ("save", "click"):
                assert got[row["item_id"]][h] == pytest.approx(row[h], abs=1e-5)
        assert [x["item"] for x in r.json()["items"]] == ref["item_id"].to_list()  # the served order
        assert r.json()["versions"]["day"] == service.state[1]


def test_an_event_is_in_the_next_call_and_moves_the_scores(served):
    client, service = served
    b = service.bundle
    user, items, t = b.user_ids[7], b.item_ids[:10], later(service, 2)
    before = client.post("/v1/rank", json={"user": user, "items": items, "time": t}, headers=AUTH).json()["items"]
    early_before = client.post("/v1/rank", json={"user": user, "items": items, "time": t - 61},
                               headers=AUTH).json()["items"]
    events = [{"user": user, "item": items[k], "action": "save", "time": t - 60 + k} for k in range(3)]
    r = client.post("/v1/events", json={"events": events, "batch_id": "batch-1"}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"appended": 3, "users": 1, "duplicate_batch": False}
    seen = client.get(f"/v1/users/{user}/events", headers=AUTH).json()["events"]
    assert [(e["item"], e["action"], e["time"]) for e in seen] == [(items[k], "save", t - 60 + k) for k in (2, 1, 0)]
    after = client.post("/v1/rank", json={"user": user, "items": items, "time": t}, headers=AUTH).json()["items"]
    moved = max(abs(a["heads"]["save"] - next(x for x in after if x["item"] == a["item"])["heads"]["save"])
                for a in before)
    assert moved > 1e-6  # the three new actions are in the sequence the ranker read
    again = client.post("/v1/events", json={"events": events, "batch_id": "batch-1"}, headers=AUTH)
    assert again.json()["duplicate_batch"] is True
    assert len(client.get(f"/v1/users/{user}/events", headers=AUTH).json()["events"]) == 3
    early = client.post("/v1/rank", json={"user": user, "items": items, "time": t - 61}, headers=AUTH).json()["items"]
    assert early == early_before  # events at or after the request's time are not in its sequence


def test_recommend_leaves_out_what_the_user_did_and_names_its_source(served):
    client, service = served
    b = service.bundle
    user = b.user_ids[11]
    r = client.post("/v1/recommend", json={"user": user, "k": 5, "n": 40}, headers=AUTH)
    body = r.json()
    assert r.status_code == 200 and body["source"] == "retrieval" and len(body["items"]) == 5
    ds = b.ds
    u = b.user_code[user]
    done = {b.item_ids[i] for i in ds.timelines.item[ds.timelines.offsets[u]:ds.timelines.offsets[u + 1]]}
    assert not done & {x["item"] for x in body["items"]}
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True) and set(body["versions"]) == {"ranker", "index", "day"}
    assert client.post("/v1/recommend", json={"user": "900001", "k": 3}, headers=AUTH).json()["source"] == "popular"
    client.post("/v1/events", json={"events": [{"user": "900001", "item": b.item_ids[0], "action": "click",
                                                "time": int(time.time())}]}, headers=AUTH)
    new = client.post("/v1/recommend", json={"user": "900001", "k": 3}, headers=AUTH).json()
    assert new["source"] == "similar-items" and b.item_ids[0] not in {x["item"] for x in new["items"]}


def test_tokens_fields_unknown_names_and_limits_are_answered_clearly(served):
    client, service = served
    b = service.bundle
    ev = {"user": "900002", "item": b.item_ids[0], "action": "click", "time": later(service)}
    assert client.post("/v1/events", json={"events": [ev]}).status_code == 401
    r = client.post("/v1/events", json={"events": [ev]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and TOKEN not in r.text
    cases = [
        (("/v1/events", {"events": [{**ev, "item": "nope"}]}), 400, "events[0].item: unknown item 'nope'"),
        (("/v1/events", {"events": [ev, {**ev, "action": "buy"}]}), 400, "events[1].action: unknown action 'buy'"),
        (("/v1/events", {"events": [{**ev, "time": int(time.time()) + 3600}]}), 400, "events[0].time"),
        (("/v1/events", {"events": [{**ev, "surface": "home"}]}), 400, "unknown surface 'home'"),
        (("/v1/events", {"events": [ev] * 51}), 400, "more than the limit of 50"),
        (("/v1/events", {"events": [{**ev, "time": "yesterday"}]}), 422, "time"),
        (("/v1/events", {"events": []}), 422, "events"),
        (("/v1/rank", {"user": "u"}), 422, "items"),
        (("/v1/rank", {"user": "u", "items": ["nope", b.item_ids[0]]}), 400, "unknown item(s) 'nope'"),
        (("/v1/rank", {"user": "u", "items": [b.item_ids[0]], "time": 5}), 400, "before the end of the served day"),
        (("/v1/recommend", {"user": "u", "k": 1000}), 400, "k: 1000 is above the limit"),
        (("/v1/recommend", {"user": "", "k": 3}), 422, "user"),
        (("/v1/recommend", {"user": "u", "time": 2**63}), 422, "time"),
        (("/v1/rank", {"user": "\U0001F600" * 65, "items": [b.item_ids[0]]}), 400, "user: an id of 260 bytes"),
    ]
    for (path, body), status, message in cases:
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == status and message in r.text, (path, body, r.text)
    r = client.post("/v1/rank", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/rank", content=b"x" * 2_000_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.get("/v1/users/nobody/embedding", headers=AUTH).json()["vectors"] == {}  # as any user
    r = client.get("/v1/users/" + "x" * 600 + "/events", headers=AUTH)
    assert r.status_code == 400 and "an id of 600 bytes, more than 256" in r.text
    emb = client.get(f"/v1/users/{b.user_ids[0]}/embedding", headers=AUTH).json()
    assert set(emb["vectors"]) == {"retrieval", "ranking"} and emb["day"] == service.state[1]
    assert client.get("/healthz").json() == {"status": "ok"} and client.get("/readyz").json()["ready"] is True
    r = client.post("/v1/rank", json={"user": "u", "items": [b.item_ids[0]]}, headers=AUTH)
    assert r.status_code == 200  # time: now
    metrics = client.get("/metrics").text
    assert 'pinnerformer_requests_total{endpoint="/v1/events",status="401"} 2.0' in metrics
    assert "pinnerformer_version_info{" in metrics and "pinnerformer_stage_seconds_bucket" in metrics


def test_concurrent_requests_are_batched_and_score_as_alone_and_a_hand_over_fails_none(served):
    client, service = served
    b = service.bundle
    t = later(service)
    reqs = [{"user": b.user_ids[k], "items": b.item_ids[k:k + 8], "time": t} for k in range(12)]
    alone = [client.post("/v1/rank", json=q, headers=AUTH).json()["items"] for q in reqs]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda q: client.post("/v1/rank", json=q, headers=AUTH), reqs))
    for a, r in zip(alone, together):
        assert r.status_code == 200
        for x, y in zip(a, r.json()["items"]):
            assert x["item"] == y["item"] and x["heads"]["save"] == pytest.approx(y["heads"]["save"], abs=1e-5)
    batches = [line for line in client.get("/metrics").text.splitlines()
               if line.startswith("pinnerformer_batch_size_count")]
    assert float(batches[0].split()[-1]) < 24  # 24 requests, fewer forward passes: some were scored together
    old_version = service.state[0].version

    def during(k):
        return client.post("/v1/rank", json=reqs[k % 12], headers=AUTH)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(during, k) for k in range(30)]
        swap = client.post("/v1/admin/reload", headers=AUTH)
        results = [f.result() for f in futures]
    assert swap.status_code == 200 and swap.json()["before"]["ranker"] == old_version["ranker"]
    assert all(r.status_code == 200 for r in results)
    assert {json.dumps(r.json()["versions"], sort_keys=True) for r in results} <= {
        json.dumps({**v, "day": service.state[1]}, sort_keys=True) for v in (old_version, service.state[0].version)}
    assert client.post("/v1/admin/reload").status_code == 401


def test_serve_cli_refuses_a_workdir_without_a_ranker_and_a_short_token_file(tmp_path, workdir):
    r = run_cli("serve", "--workdir", tmp_path)
    assert r.exit_code == 2 and "no rank-run/" in r.stderr and "Traceback" not in r.output
    (tmp_path / "tok").write_text("short")
    r = run_cli("serve", "--workdir", workdir, "--token-file", tmp_path / "tok")
    assert r.exit_code == 2 and "shorter than 16 characters" in r.stderr



def test_no_input_the_schema_allows_gets_a_server_error(workdir, tmp_path):
    """Schemathesis generates requests for every operation of the OpenAPI schema (bodies, paths and queries the
    schema allows, and some it does not), with and without the token: none may get a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from pinnerformer.serving.app import ServiceSettings, create_app
    from pinnerformer.serving.server import build_service

    service = build_service(workdir, str(tmp_path / "store"), TOKEN, ServiceSettings(max_events=20),
                            log=lambda s: None)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    calls = {}
    for result in schema.get_all_operations():
        op = result.ok()

        # derandomized in CI (the same cases every run); PINNERFORMER_FUZZ_EXAMPLES=N explores N random cases each
        @settings(max_examples=FUZZ_EXAMPLES or 25, derandomize=not FUZZ_EXAMPLES, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def no_5xx(case):
            with_token = hash(repr(case.body)) % 4 != 0  # mostly with the token, sometimes without
            response = case.call(headers=AUTH if with_token else None)
            calls[op.label] = calls.get(op.label, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        no_5xx()
    assert len(calls) == 9 and min(calls.values()) >= 1, calls  # every operation was exercised


def _serve(workdir, store, port, tmp_path, *extra):
    import subprocess
    import sys

    env = {**os.environ, "PINNERFORMER_API_TOKEN": TOKEN}
    log = open(tmp_path / f"serve-{port}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "pinnerformer.cli", "serve", "--workdir", str(workdir),
                             "--store", store, "--port", str(port), *extra], env=env, stdout=log, stderr=log)


def _wait_ready(url, proc, timeout=60):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the service exited at start"
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the service did not become ready")


@pytest.mark.parametrize("backend", ["lmdb", "redis"])
def test_the_service_killed_during_ingestion_loses_no_acknowledged_event_and_duplicates_none(
        backend, workdir, tmp_path, request):
    """kill -9 of `pinnerformer serve` while a client posts batches of events (each with a batch id); restarted on
    the same store: every acknowledged batch is there once, whole; the client resends everything it sent (the
    unacknowledged last one included) and nothing is duplicated."""
    import threading

    import httpx

    from pinnerformer.serving.redis_server import free_port

    store = str(tmp_path / "store") if backend == "lmdb" else request.getfixturevalue("redis_url")
    if backend == "redis":
        import redis

        redis.Redis.from_url(store).flushdb()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(workdir, store, port, tmp_path)
    try:
        _wait_ready(url, proc)
        items = [str(i) for i in range(20)]
        sent, acked, stop = [], [], threading.Event()

        def batch(b):
            return {"batch_id": f"b{b}", "events": [{"user": f"{800 + u}", "item": items[(b + u) % 20], "action": "click",
                                                     "time": 1_700_000_000 + b} for u in range(3)]}

        def client():
            with httpx.Client(base_url=url, headers=AUTH, timeout=5) as c:
                b = 0
                while not stop.is_set():
                    sent.append(b)
                    try:
                        r = c.post("/v1/events", json=batch(b))
                    except httpx.HTTPError:
                        return  # the service died under this request
                    assert r.status_code == 200, r.text
                    acked.append(b)
                    b += 1

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()  # kill -9 in the middle of the stream
        proc.wait()
        stop.set()
        t.join(10)
        assert len(acked) >= 60, "the client did not get going"
        proc = _serve(workdir, store, port, tmp_path)
        _wait_ready(url, proc)
        with httpx.Client(base_url=url, headers=AUTH, timeout=5) as c:
            present = [{e["time"] - 1_700_000_000 for e in c.get(f"/v1/users/{800 + u}/events",
                                                                params={"limit": 1000}).json()["events"]}
                       for u in range(3)]
            assert present[0] == present[1] == present[2]  # a batch is whole or absent
            assert set(acked) <= present[0] and present[0] <= set(sent)
            resent = [c.post("/v1/events", json=batch(b)).json() for b in sent]
            assert all(r["duplicate_batch"] for b, r in zip(sent, resent) if b in present[0])
            after = [len(c.get(f"/v1/users/{800 + u}/events", params={"limit": 1000}).json()["events"]) for u in range(3)]
            assert after == [len(sent)] * 3  # each batch exactly once, the lost one now too
    finally:
        proc.kill()
        proc.wait()


def test_redis_restarted_under_the_service_gives_503s_then_recovers_without_a_restart(workdir, tmp_path):
    from fastapi.testclient import TestClient

    from pinnerformer.serving.app import create_app
    from pinnerformer.serving.redis_server import RedisServer
    from pinnerformer.serving.server import build_service

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        service = build_service(workdir, server.url, TOKEN, log=lambda s: None)
        b = service.bundle
        ev = {"events": [{"user": "810", "item": b.item_ids[0], "action": "click", "time": int(time.time())}]}
        with TestClient(create_app(service)) as client:
            assert client.post("/v1/events", json=ev, headers=AUTH).status_code == 200
            server.kill()
            for r in (client.post("/v1/events", json=ev, headers=AUTH), client.get("/readyz"),
                      client.post("/v1/recommend", json={"user": "810", "k": 3}, headers=AUTH),
                      client.post("/v1/rank", json={"user": "810", "items": b.item_ids[:3]}, headers=AUTH)):
                assert r.status_code == 503 and f"Redis at {server.url} is unreachable" in r.text, r.text
            server.start()  # same port and directory: the append-only file is replayed
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/events", json=ev, headers=AUTH).status_code == 200
            # the first one survived the crash
            assert len(client.get("/v1/users/810/events", headers=AUTH).json()["events"]) == 2
    finally:
        server.stop()


def test_a_new_days_snapshot_is_served_as_it_appears(workdir, tmp_path):
    import datetime as dt

    from fastapi.testclient import TestClient

    from pinnerformer.data.dataset import Dataset
    from pinnerformer.inference.daily_embed import DailyJob
    from pinnerformer.serving.app import ServiceSettings, create_app
    from pinnerformer.serving.server import build_service

    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("store", "api-token"))
    service = build_service(wd, str(tmp_path / "store"), TOKEN, ServiceSettings(watch_seconds=0.2),
                            log=lambda s: None)
    first = service.state[1]
    with TestClient(create_app(service)) as client:
        day = dt.date.fromisoformat(first[:10]) + dt.timedelta(days=1)
        DailyJob(wd / "run", Dataset.open(wd / "dataset"), day, wd / "snapshots").run(log=lambda s: None)
        deadline = time.monotonic() + 30
        while service.state[1][:10] != day.isoformat() and time.monotonic() < deadline:
            client.get("/healthz")
            time.sleep(0.1)
        assert service.state[1][:10] == day.isoformat()
        r = client.post("/v1/recommend", json={"user": service.bundle.user_ids[0], "k": 2}, headers=AUTH)
        assert r.status_code == 200 and r.json()["versions"]["day"] == service.state[1] != first


def test_sigterm_lets_the_request_in_flight_finish(workdir, tmp_path):
    """SIGTERM while a ranking request waits in the batcher (batch wait 2 s): the request is answered (200), then
    the service exits (by the signal, which uvicorn re-raises after its graceful shutdown)."""
    import signal
    import threading

    import httpx

    from pinnerformer.serving.redis_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(workdir, str(tmp_path / "store"), port, tmp_path, "--batch-wait-ms", "2000")
    try:
        _wait_ready(url, proc)
        items = [str(i) for i in range(5)]
        result = {}

        def ask():
            result["r"] = httpx.post(url + "/v1/rank", json={"user": "0", "items": items}, headers=AUTH, timeout=30)

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.7)  # the request is in the batcher's 2 s wait
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200 and len(result["r"].json()["items"]) == 5
        # uvicorn re-raises the signal once it has shut down: the process ends by SIGTERM, after the answer
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
