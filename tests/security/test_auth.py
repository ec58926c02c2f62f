"""Who may do what: every API endpoint needs a token (only the public rows of the route table do
not: /healthz, /metrics, the catalogue), the app serves exactly the routes of its table, each
token's scopes are enforced on every route, the store keeps no token secret, secrets are compared
in constant time, each token is rate limited (429 + Retry-After, and the agent backs off and loses
nothing), and ``moxco serve`` listens on loopback unless told otherwise. There are no projects or
tenants: a ``read`` token reads every run (docs/security.md)."""

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
OPEN = {(method, r.path) for r in ROUTES if r.scope == "public" and r.in_schema for method in r.methods}


@pytest.fixture
def secured(tmp_path):
    """An app with auth on, a run with one point and one decision, and a token per scope."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    tokens = {scope: store.create_token(f"t-{scope}", [scope])[1] for scope in SCOPES}
    _fill(store)
    app = create_app(store=store, migrate=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, tokens, url, app
    store.close()


def _fill(store) -> None:
    """Run ``r`` with one point and one decision (again after a test deleted it)."""
    store.put_run("r")
    store.ingest("r", (["loss"], [1], [0.5], [1.7e9], [-1]), batch_id="b0")
    store.add_decision("r", Decision(1, {"phase": 2}, source="operator"))


def operations(app):
    """Every (method, path with parameters filled, scope) of the OpenAPI document."""
    schema = app.openapi()
    fill = {"{run}": "r", "{metric}": "loss", "{decision_id}": "r:operator:1"}
    for path, methods in schema["paths"].items():
        concrete = path
        for k, v in fill.items():
            concrete = concrete.replace(k, v)
        for method, op in methods.items():
            scope = op["tags"][0] if op["tags"][0] in SCOPES else None
            yield method.upper(), path, concrete, scope


def body_for(path: str):
    if path.endswith("/batches"):
        return {"batch_id": "x1", "points": [["loss", 2, 1.0, 1.7e9]]}
    if path.endswith("/ack"):
        return {"applied_step": 3}
    if path.endswith("/decisions"):
        return {"action": {"phase": 2, "alpha": 0.1}, "step": 9}
    return {"config": {}}


def test_every_endpoint_but_health_and_metrics_needs_a_token(secured):
    client, _, _, app = secured
    checked = 0
    for method, path, concrete, _ in operations(app):
        for header in (None, "Bearer mox_not-a-token", "Basic dXNlcjpwYXNz", "Bearer "):
            headers = {"Authorization": header} if header else {}
            r = client.request(method, concrete, json=body_for(path) if method in ("PUT", "PATCH", "POST") else None,
                               headers=headers)
            checked += 1
            if (method, path) in OPEN:
                assert r.status_code == 200, (method, path, r.text)
            else:
                assert r.status_code == 401, (method, path, header, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"]["code"] == "unauthorized"
    # the built-in pages are static files with no data in them (they read the API with a token)
    for page in ("/", "/runs/r"):
        r = client.get(page)
        assert r.status_code == 200 and "0.5" not in r.text and "r:operator" not in r.text
    assert checked >= 40


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


def test_scopes_are_enforced_on_every_route(secured):
    client, tokens, _, app = secured
    matrix = 0
    for method, path, concrete, needed in operations(app):
        if needed is None:
            continue
        for scope, secret in tokens.items():
            r = client.request(method, concrete, json=body_for(path) if method in ("PUT", "PATCH", "POST") else None,
                               headers={"Authorization": f"Bearer {secret}"})
            matrix += 1
            if scope in (needed, "admin"):
                assert r.status_code in (200, 201), (scope, method, path, r.text)
                if method == "DELETE":
                    _fill(app.state.store)
            else:
                assert r.status_code == 403, (scope, method, path, r.text)
                assert f"lacks the {needed!r} scope" in r.json()["error"]["message"]
    # an ingest token can neither decide nor read
    ingest = {"Authorization": f"Bearer {tokens['ingest']}"}
    assert client.post("/api/v1/runs/r/decisions", json={"action": {"phase": 2}}, headers=ingest).status_code == 403
    assert client.get("/api/v1/runs", headers=ingest).status_code == 403
    assert client.get("/api/v1/runs/r/series/loss", headers=ingest).status_code == 403
    assert matrix >= 40


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
