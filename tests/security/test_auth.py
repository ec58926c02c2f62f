"""Who may do what, generated from the route table: every route × {no token, a wrong token,
ingest, read, decide, admin} as its row says, and every route without auth answering loopback
hosts only; the app serves exactly the routes of its table; the store keeps no token secret,
secrets are compared in constant time, each token is rate limited (429 + Retry-After, and the
agent backs off and loses nothing), and ``moxco serve`` listens on loopback unless told
otherwise. There are no projects or tenants: a ``read`` token reads every run, an ``ingest``
token writes the runs it registered (docs/security.md)."""

from __future__ import annotations

import hmac
import socket
import sqlite3
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from moxco.collector.api import ROUTES, create_app
from moxco.collector.auth import TokenBucket
from moxco.collector.store import Store
from moxco.decision import Decision
from tests.agent.test_transport import points
from tests.figures import figure
from tests.servers import CollectorProcess

SCOPES = ("ingest", "read", "decide", "admin")


@pytest.fixture
def secured(tmp_path):
    """An app with auth on (and its Swagger page), a token per scope, and a run ``r`` registered by
    the ``ingest`` token with one point and one pending decision."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    ids, tokens = {}, {}
    for scope in SCOPES:
        ids[scope], tokens[scope] = store.create_token(f"t-{scope}", [scope])
    _fill(store, ids["ingest"])
    app = create_app(store=store, migrate=False, api_docs=True)
    app.state.ingest_token_id = ids["ingest"]
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as client:
        yield client, tokens, url, app
    store.close()


def _fill(store, owner) -> None:
    """Run ``r``, registered by the ``ingest`` token, with one point and one pending decision
    (again after the matrix deleted it)."""
    store.put_run("r", token_id=owner)
    store.ingest("r", (["loss"], [1], [0.5], [1.7e9], [-1]), batch_id="b0")
    store.add_decision("r", Decision(1, {"phase": 2}, source="operator"))


# One request per row of the route table (method, path): the test below fails for a route without
# one, so a route cannot ship without its authorization being tested.
REQUESTS = {
    ("GET", "/healthz"): ("/healthz", None),
    ("GET", "/metrics"): ("/metrics", None),
    ("GET", "/api/v1/openapi.json"): ("/api/v1/openapi.json", None),
    ("HEAD", "/api/v1/openapi.json"): ("/api/v1/openapi.json", None),
    ("GET", "/api/v1/docs"): ("/api/v1/docs", None),
    ("HEAD", "/api/v1/docs"): ("/api/v1/docs", None),
    ("GET", "/api/v1/catalogue"): ("/api/v1/catalogue", None),
    ("POST", "/api/v1/runs"): ("/api/v1/runs", {"name": "r", "resume": True}),
    ("PUT", "/api/v1/runs/{run}"): ("/api/v1/runs/r", {"config": {"k": 1}}),
    ("PATCH", "/api/v1/runs/{run}"): ("/api/v1/runs/r", {"status": "running"}),
    ("PUT", "/api/v1/runs/{run}/policy"): ("/api/v1/runs/r/policy", {"policy": None}),
    ("GET", "/api/v1/runs"): ("/api/v1/runs", None),
    ("GET", "/api/v1/runs/{run}"): ("/api/v1/runs/r", None),
    ("DELETE", "/api/v1/runs/{run}"): ("/api/v1/runs/r", None),
    ("GET", "/api/v1/runs/{run}/export"): ("/api/v1/runs/r/export?format=csv", None),
    ("POST", "/api/v1/runs/{run}/batches"): ("/api/v1/runs/r/batches",
                                             {"batch_id": "x1", "points": [["loss", 2, 1.0, 1.7e9]]}),
    ("GET", "/api/v1/runs/{run}/decisions/pending"): ("/api/v1/runs/r/decisions/pending", None),
    ("POST", "/api/v1/runs/{run}/decisions/{decision_id}/ack"): ("/api/v1/runs/r/decisions/r:operator:1/ack",
                                                                 {"applied_step": 3}),
    ("POST", "/api/v1/runs/{run}/decisions"): ("/api/v1/runs/r/decisions", {"action": {"phase": 2, "alpha": 0.1},
                                                                            "step": 9}),
    ("GET", "/api/v1/runs/{run}/decisions"): ("/api/v1/runs/r/decisions", None),
    ("GET", "/api/v1/runs/{run}/latest"): ("/api/v1/runs/r/latest", None),
    ("GET", "/api/v1/runs/{run}/series/{metric:metric_name}"): ("/api/v1/runs/r/series/loss", None),
    ("GET", "/"): ("/", None),
    ("HEAD", "/"): ("/", None),
    ("GET", "/runs"): ("/runs", None),
    ("GET", "/runs/"): ("/runs/?name=r", None),
    ("HEAD", "/runs/"): ("/runs/?name=r", None),
    ("GET", "/runs/{run}"): ("/runs/r", None),
    ("HEAD", "/runs/{run}"): ("/runs/r", None),
    ("GET", "/compare"): ("/compare?run=r", None),
    ("HEAD", "/compare"): ("/compare?run=r", None),
}
IDENTITIES = ("no token", "wrong token", *SCOPES)


def route_rows():
    return [(method, route) for route in ROUTES for method in route.methods]


def send(client, method, path, headers=None):
    concrete, body = REQUESTS[(method, path)]
    return client.request(method, concrete, json=body, headers=headers or {})


def ok(status: int) -> bool:
    return status in (200, 201, 307)  # 307: /runs → /runs/


def test_every_route_of_the_table_times_every_identity_is_authorized_as_its_row_says(secured):
    """Generated from ``ROUTES``: every (method, path) × {no token, wrong token, ingest, read,
    decide, admin}: public rows answer everyone; the others 401 without a valid token, 403 for a
    token without the row's scope (or admin), 2xx otherwise (the ``ingest`` token registered the run)."""
    client, tokens, _, _ = secured
    rows = route_rows()
    assert {(m, r.path) for m, r in rows} == set(REQUESTS), "every route needs a row in REQUESTS (and only routes)"
    matrix = 0
    for method, route in rows:
        for who in IDENTITIES:
            header = {"no token": None, "wrong token": "Bearer mox_not-a-token"}.get(who, f"Bearer {tokens.get(who)}")
            r = send(client, method, route.path, {"Authorization": header} if header else {})
            matrix += 1
            where = (who, method, route.path, r.status_code, r.text[:200])
            if route.scope == "public":
                assert ok(r.status_code), where
            elif who in ("no token", "wrong token"):
                assert r.status_code == 401, where
                assert r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"]["code"] == "unauthorized"
            elif who in (route.scope, "admin"):
                assert ok(r.status_code), where
                if method == "DELETE":  # the run is gone: again for the next rows
                    _fill(secured[3].state.store, secured[3].state.ingest_token_id)
            else:
                assert r.status_code == 403, where
                assert f"lacks the {route.scope!r} scope" in r.json()["error"]["message"], where
    assert matrix == len(REQUESTS) * len(IDENTITIES)
    # the built-in pages are static files with no data in them (they read the API with a token)
    for page in ("/", "/runs/r"):
        r = client.get(page)
        assert r.status_code == 200 and "0.5" not in r.text and "r:operator" not in r.text


def test_without_auth_every_route_answers_loopback_hosts_only(tmp_path):
    """``--no-auth``: every row of the table answers a request addressed to 127.0.0.1, localhost or
    [::1], and refuses (403, saying why) one whose Host or Origin is anything else (DNS rebinding,
    another site's page)."""
    store = Store(f"sqlite:///{tmp_path / 'open.db'}")
    _fill(store, None)
    app = create_app(store=store, migrate=False, auth=False, api_docs=True)
    tried = 0
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False, base_url="http://127.0.0.1:8000") as c:
        for method, route in route_rows():
            for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
                r = send(c, method, route.path, {"Host": host, "Origin": f"http://{host}"})
                assert ok(r.status_code), (host, method, route.path, r.text[:200])
                if method == "DELETE":  # the run is gone: again for the next requests
                    _fill(store, None)
            for headers in ({"Host": "attacker-rebound.example"}, {"Host": "10.0.0.5:8000"}, {"Host": ""},
                            {"Host": "127.0.0.1:8000", "Origin": "http://evil.example"},
                            {"Host": "127.0.0.1:8000", "Origin": "null"}):
                r = send(c, method, route.path, headers)
                tried += 1
                assert r.status_code == 403, (headers, method, route.path, r.status_code)
                if method != "HEAD":
                    assert "without auth" in r.json()["error"]["message"]
    assert tried == 5 * len(REQUESTS)
    store.close()


def test_every_route_the_app_serves_has_a_row_in_the_route_table_and_every_row_a_route(tmp_path):
    """The app is built from ``ROUTES`` alone: the same (method, path) pairs, each behind the
    scope of its row (``/metrics`` behind ``read`` when the app guards it), tagged with it."""
    from starlette.routing import Mount

    from moxco.collector.api.routes.pages import STATIC_PATH

    for metrics_auth in (False, True):
        app = create_app(f"sqlite:///{tmp_path / 'table.db'}", metrics_auth=metrics_auth)
        served = {}
        for route in app.routes:
            if isinstance(route, Mount):
                assert route.path == STATIC_PATH  # the pages' static files: no data, no route of their own
                continue
            scopes = [d.dependency.scope for d in getattr(route, "dependencies", []) if hasattr(d.dependency, "scope")]
            scope = scopes[0] if scopes else "public"
            assert getattr(route, "tags", [scope]) == [scope], route.path
            served.update({(method, route.path): scope for method in route.methods})
        table = {(method, r.path): (r.guarded_scope if metrics_auth and r.guarded_scope else r.scope)
                 for r in ROUTES for method in r.methods}
        assert served == table
        assert table[("GET", "/metrics")] == ("read" if metrics_auth else "public")
        app.state.store.close()
    assert {r.scope for r in ROUTES} <= {"public", "ingest", "read", "decide", "admin"}
    assert {r.path for r in ROUTES if r.scope == "public" and r.in_schema} == {"/healthz", "/metrics",
                                                                                 "/api/v1/catalogue"}


def test_the_store_holds_no_token_secret_and_compares_in_constant_time(secured, monkeypatch):
    client, tokens, url, _ = secured
    path = Path(url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:  # fold the WAL in, then read every byte of the file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        dump = "\n".join(conn.iterdump())
    raw = path.read_bytes() + dump.encode()
    for secret in tokens.values():
        assert secret.startswith("mox_") and len(secret) >= 40
        body = secret.removeprefix("mox_")
        assert body.encode() not in raw and body[:16].encode() not in raw
    calls = []
    original = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: (calls.append(1), original(a, b))[1])
    assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {tokens['read']}"}).status_code == 200
    assert calls, "the token's digest must be compared with hmac.compare_digest"


def test_token_bucket_per_token_with_retry_after(tmp_path):
    now = [0.0]
    limiter = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    a, b = store.create_token("a", ["read"])[1], store.create_token("b", ["read"])[1]
    app = create_app(store=store, migrate=False, rate_limiter=limiter)
    with TestClient(app) as client:
        get = lambda token: client.get("/api/v1/runs", headers={"Authorization": f"Bearer {token}"})
        assert [get(a).status_code for _ in range(3)] == [200, 200, 200]  # the burst
        r = get(a)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "rate_limited" and "'a'" in r.json()["error"]["message"]
        assert get(b).status_code == 200  # per token
        now[0] += 0.5  # one credit back at 2/s
        assert get(a).status_code == 200 and get(a).status_code == 429
        assert client.get("/healthz").status_code == 200  # health is never limited
    store.close()


def test_served_rate_limit_the_agent_backs_off_and_loses_nothing_and_loopback_by_default(tmp_path, monkeypatch):
    collector = CollectorProcess.in_directory(tmp_path, None, "--rate-limit", "4", "--rate-burst", "4", auth=True)
    _, secret = collector.store().create_token("trainer", ["ingest", "read"])
    collector.start()
    try:
        # bound to loopback when --host is not given (the CLI's default)
        listening = [c.laddr for c in psutil.Process(collector.process.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
        monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
        from moxco.agent.transport import HttpSink

        sink = HttpSink(collector.url, "limited", token=secret, batch_points=10, linger=0.01, max_backoff=0.5)
        sink.put_run("limited", policy=None)
        for chunk in range(30):  # 30 batches as fast as the sender can: far above 4 requests/s
            sink.ingest("limited", points([("loss", s) for s in range(chunk * 10, chunk * 10 + 10)]))
        assert sink.flush(120)
        sink.close()
        steps, _ = collector.store().series("limited", "loss")
        metrics = httpx.get(f"{collector.url}/metrics").text
        limited = [line for line in metrics.splitlines() if line.startswith('moxco_collector_errors_total{kind="rate_limited"}')]
        count = int(float(limited[0].split()[-1])) if limited else 0
        figure("agent bursting 31 requests at a collector limited to 4/s per token",
               points_sent=300, stored=int(steps.size), duplicated=int(steps.size - len(set(steps.tolist()))),
               answered_429=count, agent_failed_requests=sink.stats.failed_requests)
        assert steps.tolist() == list(range(300))
        assert count > 0 and sink.stats.failed_requests >= count and sink.stats.points_dropped == 0
    finally:
        collector.stop()


def test_serve_defaults_to_loopback():
    import argparse

    from moxco.collector.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.rate_limit == 0 and args.stale_after == 600
    with socket.socket() as s:  # sanity: the documented default is a loopback address
        s.bind((args.host, 0))
        assert s.getsockname()[0] == "127.0.0.1"
