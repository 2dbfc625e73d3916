"""The service's security review (issue 30): every /v1/ endpoint needs a token, a read-only token cannot write, the
Bearer scheme is required, weak tokens and non-loopback hosts are refused; an unknown user is answered as a user
without data; request bodies are limited by the bytes received and 422s never echo the input; unknown fields,
booleans and non-integers as times, NaN, blank ids and control characters are refused while numeric ids are taken
as strings; duplicate candidates and events older than the served day version are refused with the reason."""

import asyncio
import json

import pytest

from tests.conftest import run_cli
from tests.test_service import AUTH, TOKEN, redis_url, served, workdir  # noqa: F401

READ = "read-only-token-0123456789"
READ_AUTH = {"Authorization": f"Bearer {READ}"}


@pytest.fixture
def svc(workdir, tmp_path):  # noqa: F811
    """(TestClient, Service) over a fresh embedded store, with a read-only token beside the read-write one."""
    from fastapi.testclient import TestClient

    from pinnerformer.serving.app import ServiceSettings, create_app
    from pinnerformer.serving.server import build_service

    service = build_service(workdir, str(tmp_path / "store"), TOKEN, ServiceSettings(max_events=50),
                            log=lambda s: None, read_token=READ)
    with TestClient(create_app(service)) as client:
        yield client, service
    service.store.close()


def event(service, **over):
    """A valid event (now, a known item and action), with fields replaced."""
    import time

    return {"user": "900100", "item": service.bundle.item_ids[0], "action": "click", "time": int(time.time()),
            **over}


def detail(r) -> str:
    return json.dumps(r.json()["detail"])


def test_every_v1_endpoint_needs_a_token_and_the_read_only_token_only_reads(svc):
    client, service = svc
    b = service.bundle
    reads = [("post", "/v1/rank", {"user": b.user_ids[0], "items": b.item_ids[:3]}),
             ("post", "/v1/recommend", {"user": b.user_ids[0], "k": 2}),
             ("get", f"/v1/users/{b.user_ids[0]}/embedding", None),
             ("get", f"/v1/users/{b.user_ids[0]}/events", None)]
    writes = [("post", "/v1/events", {"events": [event(service)]}), ("post", "/v1/admin/reload", None)]
    for method, path, body in reads + writes:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "}):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["detail"] == "missing or wrong bearer token", (path, headers)
            assert r.headers["WWW-Authenticate"] == "Bearer" and TOKEN not in r.text and READ not in r.text
    for method, path, body in reads:
        for token in (READ, TOKEN):
            r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, (path, r.text)
    for method, path, body in writes:
        r = client.request(method, path, json=body, headers=READ_AUTH)
        assert r.status_code == 403 and r.json()["detail"] == (f"POST {path} needs the read-write token; this one "
                                                               "is read-only"), r.text
    for scheme in ("bearer", "BEARER", "Bearer"):  # the scheme in any case
        r = client.post("/v1/events", json={"events": [event(service)]}, headers={"Authorization": f"{scheme} {TOKEN}"})
        assert r.status_code == 200 and r.json()["appended"] == 1, r.text
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers hold no token
        assert client.get(path).status_code == 200
    metrics = client.get("/metrics").text
    assert 'pinnerformer_requests_total{endpoint="/v1/events",status="403"} 1.0' in metrics


def test_the_read_only_token_must_differ_and_weak_tokens_are_refused(workdir, tmp_path, monkeypatch):  # noqa: F811
    from pinnerformer.errors import PinnerformerError
    from pinnerformer.serving.server import build_service

    with pytest.raises(PinnerformerError, match="the read-only token is the read-write token"):
        build_service(workdir, str(tmp_path / "store"), TOKEN, log=lambda s: None, read_token=TOKEN)
    monkeypatch.setenv("PINNERFORMER_API_TOKEN", "short-token")
    r = run_cli("serve", "--workdir", workdir)
    assert r.exit_code == 2 and "PINNERFORMER_API_TOKEN: the token is shorter than 16 characters" in r.stderr
    monkeypatch.setenv("PINNERFORMER_API_TOKEN", TOKEN)
    monkeypatch.setenv("PINNERFORMER_API_READ_TOKEN", "  short  ")
    r = run_cli("serve", "--workdir", workdir)
    assert r.exit_code == 2 and "PINNERFORMER_API_READ_TOKEN: the token is shorter than 16 characters" in r.stderr
    monkeypatch.delenv("PINNERFORMER_API_READ_TOKEN")
    (tmp_path / "read").write_text("tiny\n")
    r = run_cli("serve", "--workdir", workdir, "--read-token-file", tmp_path / "read")
    assert r.exit_code == 2 and f"--read-token-file {tmp_path / 'read'}: the token is shorter" in r.stderr
    r = run_cli("serve", "--workdir", workdir, "--read-token-file", tmp_path / "absent")
    assert r.exit_code == 2 and "no such file" in r.stderr


def test_serve_refuses_a_non_loopback_host_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("PINNERFORMER_API_TOKEN", TOKEN)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        r = run_cli("serve", "--workdir", tmp_path, "--host", host)
        assert r.exit_code == 2 and f"--host {host} is not a loopback address" in r.stderr, r.output
        assert "TLS and an authenticating proxy must sit in front of it" in r.stderr and "--allow-remote" in r.stderr
    for args in (["--host", "0.0.0.0", "--allow-remote"], ["--host", "localhost"], ["--host", "::1"], []):
        r = run_cli("serve", "--workdir", tmp_path, *args)  # past the host check: the empty workdir is refused
        assert r.exit_code == 2 and "no rank-run/" in r.stderr and "loopback" not in r.stderr, (args, r.output)


def test_an_unknown_user_gets_the_answer_of_a_user_without_data(served):  # noqa: F811
    client, service = served
    known = service.bundle.user_ids[0]
    for user in ("nobody-at-all", "900200"):
        emb = client.get(f"/v1/users/{user}/embedding", headers=AUTH)
        assert emb.status_code == 200 and emb.json() == {"user": user, "day": service.state[1], "vectors": {}}
        ev = client.get(f"/v1/users/{user}/events", headers=AUTH)
        assert ev.status_code == 200 and ev.json() == {"user": user, "events": []}
    emb = client.get(f"/v1/users/{known}/embedding", headers=AUTH).json()
    assert set(emb) == {"user", "day", "vectors"} and set(emb["vectors"]) == {"retrieval", "ranking"}
    assert client.get(f"/v1/users/{known}/events", headers=AUTH).json() == {"user": known, "events": []}


def test_docs_pages_are_off_and_the_schema_stays(svc):
    from pinnerformer.serving.app import ServiceSettings

    client, _ = svc
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/v1/rank" in schema.json()["paths"]
    assert "docs" not in ServiceSettings.model_fields  # no switch that would bring the CDN pages back


def test_a_body_is_limited_by_the_bytes_received_with_or_without_content_length(svc):
    client, service = svc
    limit = service.settings.max_body_bytes
    message = f"request body over {limit:,} bytes"

    def chunked():  # 5 MB, Transfer-Encoding: chunked (no Content-Length)
        for _ in range(80):
            yield b"x" * 65536

    r = client.post("/v1/rank", content=chunked(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == {"detail": message}
    r = client.post("/v1/rank", content=b"x" * (limit + 1), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == {"detail": message}  # Content-Length over: refused before reading
    r = client.post("/v1/rank", content=b"{}", headers={**AUTH, "Content-Type": "application/json",
                                                        "Content-Length": "not-a-number"})
    assert r.status_code == 413
    metrics = client.get("/metrics").text
    assert 'pinnerformer_requests_total{endpoint="/v1/rank",status="413"} 1.0' in metrics  # the chunked one
    # a client that never ends its chunked body: the service stops reading at the limit and answers
    from pinnerformer.serving.app import create_app

    reads, sent = 0, []

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/rank", "raw_path": b"/v1/rank", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    asyncio.run(asyncio.wait_for(create_app(service)(scope, receive, send), 30))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert reads == limit // 65536 + 1  # the first chunk past the limit, no more
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:])) == {"detail": message}


def test_a_422_names_the_field_and_never_echoes_the_input(svc):
    client, service = svc
    huge = "x" * 900_000
    for body, field in (({"user": huge, "items": ["1"]}, "user"),
                        ({"user": "u", "items": ["1"], huge: 1}, "x" * 64),
                        ({"user": "u", "items": ["1"], "time": huge}, "time")):
        r = client.post("/v1/rank", json=body, headers=AUTH)
        assert r.status_code == 422 and len(r.content) < 500 and field in r.text, r.text[:300]
        assert set(r.json()["detail"][0]) == {"loc", "msg", "type"}
    for field, value in (("time", b"NaN"), ("time", b"Infinity"), ("duration", b"NaN"), ("duration", b"-Infinity"),
                         ("duration", b"1e999")):  # JSON's NaN / Infinity: FastAPI's own 422 was a 500 here
        ev = json.dumps(event(service, **{field: 0}))
        content = ev.replace(f'"{field}": 0', f'"{field}": {value.decode()}').encode()
        r = client.post("/v1/events", content=b'{"events": [' + content + b"]}",
                        headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events", 0, field], r.text
    r = client.post("/v1/rank", content=b'{"user": "u", "items": [', headers={**AUTH,
                                                                           "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == [{"loc": ["body", 24], "msg": "JSON decode error",
                                                            "type": "json_invalid"}]


def test_unknown_fields_are_refused(svc):
    client, service = svc
    b = service.bundle
    cases = [("/v1/events", {"events": [event(service)], "batchid": "x"}, ["body", "batchid"]),
             ("/v1/events", {"events": [event(service, surfce="home")]}, ["body", "events", 0, "surfce"]),
             ("/v1/rank", {"user": "u", "items": b.item_ids[:2], "k": 3}, ["body", "k"]),
             ("/v1/recommend", {"user": "u", "k": 3, "item": b.item_ids[0]}, ["body", "item"])]
    for path, body, loc in cases:
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"] == [
            {"loc": loc, "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}], r.text
    r = client.post("/v1/events", json={"events": [event(service)], "client": "app-1", "batch_id": "b1"},
                    headers=AUTH)
    assert r.status_code == 200, r.text  # the fields the schema has are taken


def test_times_are_integers_and_ids_are_strings_or_integers(svc):
    client, service = svc
    b = service.bundle
    item = b.item_ids[0]
    bad = [("/v1/events", {"events": [event(service, time=True)]}, "time", "int_type"),
           ("/v1/events", {"events": [event(service, time=float(event(service)["time"]))]}, "time", "int_type"),
           ("/v1/events", {"events": [event(service, time=str(event(service)["time"]))]}, "time", "int_type"),
           ("/v1/events", {"events": [event(service, duration=True)]}, "duration", "float_type"),
           ("/v1/rank", {"user": "u", "items": [item], "time": True}, "time", "int_type"),
           ("/v1/recommend", {"user": "u", "time": 1.5}, "time", "int_type"),
           ("/v1/recommend", {"user": "u", "k": True}, "k", "int_type"),
           ("/v1/rank", {"user": True, "items": [item]}, "user", "an id is a string or an integer"),
           ("/v1/rank", {"user": 1.0, "items": [item]}, "user", "an id is a string or an integer"),
           ("/v1/rank", {"user": None, "items": [item]}, "user", "an id is a string or an integer"),
           ("/v1/rank", {"user": "u", "items": [item, False]}, "items", "an id is a string or an integer"),
           ("/v1/events", {"events": [event(service, item=None)]}, "item", "an id is a string or an integer"),
           ("/v1/rank", {"user": " \t ", "items": [item]}, "user", "an id may not be blank"),
           ("/v1/recommend", {"user": ""}, "user", "an id may not be blank"),
           ("/v1/events", {"events": [event(service, user="a\x00b")]}, "user", "control characters"),
           ("/v1/events", {"events": [event(service, item=item + "\n")]}, "item", "control characters"),
           ("/v1/rank", {"user": "u\x7f", "items": [item]}, "user", "control characters"),
           ("/v1/rank", {"user": "u", "items": ["\ud800"]}, "items", "lone surrogates")]
    for path, body, field, why in bad:  # json.dumps: ASCII escapes (the client's own encoder refuses a surrogate)
        r = client.post(path, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422 and field in detail(r) and why in detail(r), (body, r.text)
    for path in ("/v1/users/%20/events", "/v1/users/a%00b/embedding", "/v1/users/a%0Ab/events"):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "user"], (path, r.text)
    assert item.isdigit()  # the planted dataset's ids are numbers: sent as JSON numbers, taken as their strings
    r = client.post("/v1/rank", json={"user": int(b.user_ids[0]), "items": [int(item), int(b.item_ids[1])]},
                    headers=AUTH)
    assert r.status_code == 200 and r.json()["user"] == b.user_ids[0], r.text
    assert {x["item"] for x in r.json()["items"]} == {item, b.item_ids[1]}
    r = client.post("/v1/events", json={"events": [event(service, user=900300, item=int(item))]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["appended"] == 1, r.text
    seen = client.get("/v1/users/900300/events", headers=AUTH).json()["events"]
    assert [e["item"] for e in seen] == [item]


def test_duplicate_candidates_are_refused_naming_them(svc):
    client, service = svc
    b = service.bundle
    x, y, z = b.item_ids[:3]
    r = client.post("/v1/rank", json={"user": "u", "items": [x, y, x, z, y, x]}, headers=AUTH)
    assert r.status_code == 400 and r.json()["detail"] == f"items: duplicate candidate(s) {x!r}, {y!r}: give each once"
    r = client.post("/v1/rank", json={"user": "u", "items": [x, int(x)]}, headers=AUTH)  # "7" and 7: one id
    assert r.status_code == 400 and f"duplicate candidate(s) {x!r}" in r.text


def test_an_event_before_the_served_day_version_is_refused(svc):
    from pinnerformer.serving.engine import version_end

    client, service = svc
    version = service.state[1]
    end = version_end(version)
    late = [event(service, time=end), event(service, time=end - 1)]
    r = client.post("/v1/events", json={"events": late}, headers=AUTH)
    assert r.status_code == 400 and r.json()["detail"] == (
        f"events[1].time: {end - 1} is before the end of the served day version {version} ({end}): ranking and "
        "recommendations read only later events from here; earlier ones belong to the batch dataset (pinnerformer "
        "data append --allow-late)")
    assert client.get("/v1/users/900100/events", headers=AUTH).json()["events"] == []  # the batch is refused whole
    r = client.post("/v1/events", json={"events": late[:1]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["appended"] == 1  # at the end itself: read by every later request
