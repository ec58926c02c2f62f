"""Bad and hostile input against the collector (on SQLite and on a real PostgreSQL): every answer
is a 2xx or a 4xx with the JSON error shape, never a 5xx, and what is accepted reads back exactly.
The count of requests tried and 5xx found is printed as a figure."""

from __future__ import annotations

import math
from urllib.parse import quote

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from moxco.agent.transport import default_spool_dir
from moxco.collector.api import create_app
from tests.figures import figure

TRIED = {"requests": 0, "5xx": 0}


def counting(c):
    """Count every request and check that none is a 5xx and every error has the JSON shape."""
    original = c.request

    def counted(method, path, **kwargs):
        r = original(method, path, **kwargs)
        TRIED["requests"] += 1
        TRIED["5xx"] += r.status_code >= 500
        assert r.status_code < 500, (method, str(path)[:200], r.status_code, r.text[:500])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["status"] == r.status_code and error["message"], r.text
        return r

    c.request = counted
    return c


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request, tmp_path):
    """The app in-process (Starlette's TestClient)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with TestClient(create_app(url, auth=False), raise_server_exceptions=False, base_url="http://127.0.0.1",
                    headers={"Content-Type": "application/json"}) as c:  # raw bodies below are sent as JSON
        yield counting(c)


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request, tmp_path, serve):
    """``moxco serve`` in a subprocess: URLs are decoded once, by uvicorn, exactly as in production
    (the in-process TestClient decodes percent-escapes twice, which would hide or fake bugs)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    server = serve(url, "--no-auth")
    with httpx.Client(base_url=server.url, timeout=60, headers={"Content-Type": "application/json"}) as c:
        yield counting(c)


def run_path(name: str) -> str:
    encoded = quote(name, safe="")
    return "/api/v1/runs/" + ("%2E" * len(name) if name in (".", "..") else encoded)


def batch(points, batch_id="b"):
    return {"batch_id": batch_id, "points": points}


NAMES = ["'; DROP TABLE runs; --", "\" OR 1=1 --", "Robert'); DELETE FROM metric_points;--", "...",
         "..\\..\\windows", "%2e%2e", "%2E", "a%2Fb", "%252e", "%00", "C:\\x", "*", "?", "[a-z]", "%", "_", "a\\", "<img src=x onerror=alert(1)>",
         "名前", "α/β".replace("/", "∕"), "🚀" * 200, "\u202eevil", "zero\u200bwidth", "e\u0301", " lead", "trail ",
         "$(rm -rf ~)", "`id`", "{{7*7}}", "${jndi:ldap:x}", "NULL", "null", "None", "0", "-1", "x" * 200]
BAD_NAMES = [".", "..", "x" * 201, "🚀" * 201, "tab\tname", "nul\x00byte", "new\nline", "del\x7f", "c1\x85"]


def test_run_names_with_sql_path_and_unicode_metacharacters_round_trip(served):
    client = served
    for name in NAMES:
        path = run_path(name)
        assert client.put(path, json={"config": {"name": name}}).status_code == 200, name
        r = client.post(path + "/batches", json=batch([["loss", 1, 0.5, 1.0]]))
        assert r.status_code == 200 and r.json()["stored"] == 1, name
        got = client.get(path).json()
        assert got["name"] == name and got["config"] == {"name": name} and got["last_step"] == 1
        assert client.get(path + "/series/loss").json()["values"] == [0.5]
        listed = client.get("/api/v1/runs", params={"name": name, "limit": 1000}).json()
        assert listed["total"] >= (1 if not any(c in name for c in "*?[") else 0)
    assert client.get("/api/v1/runs", params={"limit": 1000}).json()["total"] == len(NAMES)
    for name in BAD_NAMES:
        r = client.put(run_path(name), json={})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_run_name", name
    # a "/" in a name cannot reach a run route; traversal in the URL path does not escape the API
    assert client.put("/api/v1/runs/a/b", json={}).status_code in (404, 405)
    assert client.get("/api/v1/runs/../../etc/passwd").status_code == 404
    assert client.get("/api/v1/runs/%2e%2e/%2e%2e/healthz").status_code in (404, 422)


def test_agent_spool_directory_names_stay_inside_the_spool_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path))
    for name in NAMES + ["../../etc", "/abs/path", "~root"]:
        path = default_spool_dir(name)
        assert path.parent == tmp_path and path.name not in (".", "..") and "/" not in path.name


def test_large_bodies_deep_nesting_and_a_million_points(client):
    run = run_path("big")
    client.put(run, json={})
    # ~10 MB of valid points: accepted whole
    n = 330_000
    body = orjson.dumps(batch([["loss", s, s * 0.5, 1.7e9 + s] for s in range(n)]))
    assert 9e6 < len(body) < 16 * 2**20
    r = client.post(run + "/batches", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["stored"] == n
    assert client.get(run + "/series/loss").json()["total"] == n
    # 10 MB that is not JSON, and 10 MB of a config string
    assert client.post(run + "/batches", content=b"\xff" * (10 << 20)).status_code == 400
    r = client.put(run, content=b'{"config":{"x":"' + b"x" * (10 << 20) + b'"}}')
    assert r.status_code == 413 and "limit is 1048576" in r.json()["error"]["message"]
    # 10^6 points in one batch: about 24 MB of JSON, past the 16 MiB default (--max-body raises it)
    million = orjson.dumps(batch([["loss", s, 1.0, 1.0] for s in range(10**6)]))
    assert len(million) > 16 * 2**20
    r = client.post(run + "/batches", content=million, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = client.post(run + "/batches", content=iter([million[i:i + 2**20] for i in range(0, len(million), 2**20)]))
    assert r.status_code == 413  # no Content-Length (chunked): cut off while streaming
    # deep nesting: past orjson's parser limit, and past the collector's 32 levels in what it stores
    deep = lambda k: b'{"a":' * k + b"{}" + b"}" * k
    assert client.put(run, content=b'{"config":' + deep(5000) + b"}").status_code == 400
    for k in (31, 100, 1000):
        r = client.put(run, content=b'{"config":' + deep(k) + b"}")
        assert r.status_code == 422 and "deeper than 32" in r.json()["error"]["message"]
        r = client.post(run + "/decisions", content=b'{"action":{"phase":2,"x":' + deep(k) + b"}}")
        assert r.status_code == 422
    assert client.post(run + "/batches", content=b'{"batch_id":"d","points":' + b"[" * 3000 + b"]" * 3000 + b"}").status_code == 400
    assert client.put(run, content=b'{"config":' + deep(20) + b"}").status_code == 200
    assert client.get("/api/v1/runs").status_code == 200  # a stored config never breaks a read


def test_non_finite_values_steps_and_clock_skew(client):
    run = run_path("values")
    client.put(run, json={})
    pts = [["v", 0, "NaN", 1.0], ["v", 1, "Infinity", 2.0], ["v", 2, "-Infinity", 3.0], ["v", 3, None, 4.0],
           ["v", 4, 1e308, 5.0], ["v", 5, -0.0, 6.0], ["v", 6, 5e-324, 7.0], ["v", 7, 2**60, 8.0]]
    assert client.post(run + "/batches", json=batch(pts, "nf")).json()["stored"] == 8
    got = client.get(run + "/series/v", params={"method": "none"}).json()
    assert got["values"][:4] == ["NaN", "Infinity", "-Infinity", "NaN"] and got["values"][4] == 1e308
    assert got["values"][6] == 5e-324 and got["values"][7] == float(2**60)
    for raw in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"nan"):  # not JSON: 400 that says what to send
        r = client.post(run + "/batches", content=b'{"batch_id":"x","points":[["v",9,' + raw + b',1.0]]}')
        assert r.status_code == 400 and '"NaN"' in r.json()["error"]["message"]
    bad = [["v", -1, 1.0, 1.0], ["v", 2**63, 1.0, 1.0], ["v", 1.5, 1.0, 1.0], ["v", True, 1.0, 1.0],
           ["v", "1", 1.0, 1.0], ["v", 1, "nan", 1.0], ["v", 1, 10**400, 1.0], ["v", 1, 1.0, "now"],
           ["v", 1, 1.0, 10**400], ["v", 1, 1.0, 1.0, -2], ["v", 1, 1.0, 1.0, 2**31], ["", 1, 1.0, 1.0],
           ["x" * 101, 1, 1.0, 1.0], [1, 1, 1.0, 1.0], ["v", 1, 1.0], ["v", 1, 1.0, 1.0, 0, 0], "v", None, {}]
    for point in bad:
        r = client.post(run + "/batches", json=batch([point], "bad"))
        assert r.status_code in (400, 422), (point, r.text)  # 400: integers past 64 bits are not parsed
    # duplicate steps: in one batch and across batches, the first write wins, stored once
    r = client.post(run + "/batches", json=batch([["d", 5, 1.0, 1.0], ["d", 5, 2.0, 1.0], ["d", 5, 3.0, 1.0]], "d1"))
    assert r.json()["stored"] == 1
    assert client.post(run + "/batches", json=batch([["d", 5, 9.0, 1.0], ["d", 6, 6.0, 1.0]], "d2")).json()["stored"] == 1
    assert client.get(run + "/series/d", params={"method": "none"}).json()["values"] == [1.0, 6.0]
    # out-of-order and negative-looking wall times (clock skew between agents and collector): stored as sent
    skew = [["w", 0, 0.0, 4.1e9], ["w", 1, 1.0, 0.0], ["w", 2, 2.0, -86400.0], ["w", 3, 3.0, 1e12], ["w", 4, 4.0, 1.7e9]]
    assert client.post(run + "/batches", json=batch(skew, "skew")).json()["stored"] == 5
    got = client.get(run + "/series/w", params={"method": "none"}).json()
    assert got["steps"] == [0, 1, 2, 3, 4] and got["wall_times"] == [4.1e9, 0.0, -86400.0, 1e12, 1.7e9]
    window = client.get(run + "/series/w", params={"method": "none", "start_time": -1e6, "end_time": 2e9}).json()
    assert window["steps"] == [1, 2, 4]
    latest = client.get(run + "/latest").json()["metrics"]["w"]
    assert latest["step"] == 4  # the newest point is by step, never by the agent's clock
    assert client.get(run + "/series/w", params={"start_time": "nan"}).status_code in (200, 422)
    assert client.get(run + "/series/w", params={"max_points": 0}).status_code == 422
    for where, params in (("/latest", {"rank": 10**20}), ("/series/w", {"rank": 2**31}),
                          ("/series/w", {"start_step": 2**63}), ("", {"offset": 2**64})):  # found by schemathesis
        assert client.get((run + where) if where else "/api/v1/runs", params=params).status_code == 422
    assert client.get(run + "/series/w", params={"start_step": -5}).status_code == 422
    assert client.get("/api/v1/runs", params={"since": "inf"}).status_code in (200, 422)


def test_sweep_uses_the_server_clock_not_the_agents(tmp_path):
    """A run whose agent's clock is years ahead is still marked interrupted when silent, and one
    whose clock is behind is not marked while it sends."""
    from moxco.collector.store import Store

    with Store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        for name, wall in (("ahead", 4.1e9), ("behind", 1.0)):
            store.put_run(name)
            store.ingest(name, (["loss"], [1], [0.5], [wall], [-1]), batch_id="b")
        import time

        now = time.time()
        assert store.sweep_stale_runs(60, now=now) == {"interrupted": [], "running": []}
        assert store.sweep_stale_runs(60, now=now + 61)["interrupted"] == ["ahead", "behind"]
        store.ingest("behind", (["loss"], [2], [0.5], [1.0], [-1]), batch_id="b2")
        assert store.sweep_stale_runs(60)["running"] == ["behind"]  # it sent again: running
        assert store.run("ahead").status == "interrupted"


def test_zz_figure():
    figure("hostile input: SQL/path/unicode run names, 10 MB bodies, deep nesting, 10^6 points, NaN/Inf, "
           "bad and duplicate steps, clock skew (SQLite and PostgreSQL)",
           requests=TRIED["requests"], found_5xx=TRIED["5xx"])
    assert TRIED["5xx"] == 0
