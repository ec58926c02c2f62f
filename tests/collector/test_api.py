"""The HTTP API of docs/api.md, the same on SQLite and PostgreSQL (FastAPI TestClient in-process)."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from moxco.collector.api import create_app
from moxco.collector.store import Store

POLICY = {"threshold": 0.85, "min_step": 0, "consecutive": 2, "cooldown": 0, "max_decisions": 1, "lag": 2,
          "action": {"phase": 2, "alpha": 0.1, "beta": 0.1}}


@pytest.fixture
def client(store_url):
    app = create_app(store_url, auth=False, max_body=128 * 1024)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.store = app.state.store
        yield c
    app.state.store.close()


def batch(c, run, batch_id, points, acks=None):
    body = {"batch_id": batch_id, "points": points}
    if acks is not None:
        body["acks"] = acks
    return c.post(f"/api/v1/runs/{run}/batches", json=body)


def test_migrations_from_empty(store_url):
    with Store(store_url) as store:
        tables = set(inspect(store.engine).get_table_names()) | set(inspect(store.engine).get_view_names())
        assert {"runs", "metric_points", "decisions", "latest_points", "batches", "tokens", "series_blocks"} <= tables
        if store.dialect == "postgresql":  # points in chunks, read through the metric_points view (0005)
            assert "point_chunks" in tables and "metric_points" in inspect(store.engine).get_view_names()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0009"
    Store(store_url).close()  # a second upgrade is a no-op


def test_register_update_list_and_get(client):
    r = client.put("/api/v1/runs/gpt2 α", json={"config": {"lr": 3e-4}, "optimizer": {"class": "AdamW"},
                                                "policy": POLICY})
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["policy"] == POLICY
    client.put("/api/v1/runs/bert", json={"config": {"x": 1}})
    client.put("/api/v1/runs/bert", json={"config": {"y": 2}})  # idempotent register merges config
    assert client.get("/api/v1/runs/bert").json()["config"] == {"x": 1, "y": 2}
    assert client.patch("/api/v1/runs/bert", json={"status": "finished"}).json()["status"] == "finished"
    listing = client.get("/api/v1/runs", params={"status": "running"}).json()
    assert [r["name"] for r in listing["runs"]] == ["gpt2 α"] and listing["total"] == 1
    assert [r["name"] for r in client.get("/api/v1/runs", params={"name": "gpt2*"}).json()["runs"]] == ["gpt2 α"]
    assert client.get("/api/v1/runs", params={"name": "GPT2*"}).json()["total"] == 0  # case-sensitive glob
    assert client.get("/api/v1/runs", params={"limit": 1, "offset": 1}).json()["runs"][0]["name"] == "gpt2 α"
    assert client.get("/api/v1/runs", params={"until": 0}).json()["total"] == 0


def test_opening_a_taken_run_name_starts_a_new_run_unless_resumed(client):
    """``POST /runs`` is an agent's registration: a free name is created (201) with a stable id; the
    same name again is a new run named ``name-2`` with another id; ``resume: true`` continues the
    run of that name (200, same id, running again, config merged); ``resume: "must"`` on a name no
    run has is a 404 that says so."""
    first = client.post("/api/v1/runs", json={"name": "mlp", "config": {"seed": 0}, "session": "a1"})
    assert first.status_code == 201 and first.json()["name"] == "mlp" and first.json()["created"] is True
    uid = first.json()["id"]
    assert len(uid) == 36 and client.get("/api/v1/runs/mlp").json()["id"] == uid
    second = client.post("/api/v1/runs", json={"name": "mlp", "config": {"seed": 1}})
    assert second.status_code == 201 and second.json()["name"] == "mlp-2" and second.json()["requested"] == "mlp"
    assert second.json()["id"] != uid
    client.patch("/api/v1/runs/mlp", json={"status": "interrupted"})
    resumed = client.post("/api/v1/runs", json={"name": "mlp", "resume": True, "config": {"resumed": 1}})
    assert resumed.status_code == 200 and resumed.json()["resumed"] is True and resumed.json()["id"] == uid
    assert resumed.json()["status"] == "running" and "config" not in resumed.json()  # a writer gets the summary
    assert client.get("/api/v1/runs/mlp").json()["config"] == {"seed": 0, "resumed": 1}
    missing = client.post("/api/v1/runs", json={"name": "nope", "resume": "must"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert client.post("/api/v1/runs", json={"name": "a/b"}).status_code == 422
    assert client.post("/api/v1/runs", json={"name": "x", "resume": "yes"}).status_code == 422


def test_nan_and_inf_round_trip_and_latest(client):
    client.put("/api/v1/runs/r", json={})
    points = [["loss", 0, 0.5, 10.0], ["loss", 1, "NaN", 11.0], ["loss", 2, "Infinity", 12.0],
              ["loss", 3, "-Infinity", 13.0], ["loss", 4, None, 14.0], ["grad_norm_sq", 4, 2, 14.0, 3]]
    assert batch(client, "r", "b0", points).json()["stored"] == 6
    got = client.get("/api/v1/runs/r/series/loss").json()
    assert got["steps"] == [0, 1, 2, 3, 4] and got["values"] == [0.5, "NaN", "Infinity", "-Infinity", "NaN"]
    assert got["wall_times"] == [10.0, 11.0, 12.0, 13.0, 14.0] and got["total"] == 5 and not got["downsampled"]
    assert client.get("/api/v1/runs/r/series/grad_norm_sq", params={"rank": 3}).json()["values"] == [2.0]
    latest = client.get("/api/v1/runs/r/latest").json()["metrics"]
    assert latest == {"loss": {"step": 4, "value": "NaN", "wall_time": 14.0}}
    assert client.get("/api/v1/runs/r").json()["metrics"] == ["grad_norm_sq", "loss"]


def test_a_metric_name_with_slashes_is_read_through_its_series_path(client):
    """Metric names may hold "/" (`val/loss`, as Lightning logs them): the series path takes the
    rest of the URL, percent-encoded or not."""
    client.put("/api/v1/runs/r", json={})
    points = [["val/loss", 0, 0.5, 10.0], ["val/loss", 5, 0.25, 11.0], ["a/b/c", 1, 2.0, 12.0], ["loss", 0, 1.0, 10.0]]
    assert batch(client, "r", "b0", points).json()["stored"] == 4
    for path in ("val%2Floss", "val/loss"):
        got = client.get(f"/api/v1/runs/r/series/{path}").json()
        assert got["metric"] == "val/loss" and got["steps"] == [0, 5] and got["values"] == [0.5, 0.25]
    assert client.get("/api/v1/runs/r/series/a%2Fb%2Fc").json()["values"] == [2.0]
    assert client.get("/api/v1/runs/r/series/val%2Floss", params={"format": "csv"}).text.splitlines()[1:] == \
        ["0,0.5,10.0", "5,0.25,11.0"]
    assert client.get("/api/v1/runs/r/series/loss").json()["values"] == [1.0]
    assert client.get("/api/v1/runs/r/series/val%2Floss%0A").status_code == 422  # the whole name is checked


def test_retried_batch_is_stored_once(client):
    client.put("/api/v1/runs/r", json={})
    points = [["loss", s, 1.0 / (s + 1), 100.0 + s] for s in range(300)]
    first = batch(client, "r", "b-1", points).json()
    again = batch(client, "r", "b-1", points).json()
    assert first["duplicate"] is False and again["duplicate"] is True and again["stored"] == first["stored"] == 300
    # a new batch overlapping stored points stores only the new ones
    assert batch(client, "r", "b-2", points[-10:] + [["loss", 300, 0.1, 1.0]]).json()["stored"] == 1
    assert client.get("/api/v1/runs/r/series/loss", params={"method": "none", "max_points": 1000}).json()["total"] == 301


def test_series_ranges_and_downsampling_keep_extremes(client):
    client.put("/api/v1/runs/r", json={})
    n = 20_000
    values = [math.sin(s / 50.0) for s in range(n)]
    values[12_345] = 50.0
    values[777] = "NaN"
    for k in range(0, n, 2000):  # several batches: the series cache must follow appends
        chunk = [["loss", s, values[s], 1000.0 + s] for s in range(k, k + 2000)]
        assert batch(client, "r", f"b{k}", chunk).status_code == 200
        assert client.get("/api/v1/runs/r/series/loss", params={"max_points": 100}).json()["total"] == k + 2000
    got = client.get("/api/v1/runs/r/series/loss", params={"max_points": 200}).json()
    assert got["downsampled"] and got["method"] == "minmax" and len(got["steps"]) <= 200
    assert 12_345 in got["steps"] and 50.0 in got["values"] and "NaN" in got["values"]
    assert got["steps"][0] == 0 and got["steps"][-1] == n - 1
    lttb = client.get("/api/v1/runs/r/series/loss", params={"max_points": 300, "method": "lttb"}).json()
    assert len(lttb["steps"]) == 300 and 12_345 in lttb["steps"]
    window = client.get("/api/v1/runs/r/series/loss", params={"start_step": 100, "end_step": 199, "method": "none",
                                                              "max_points": 100}).json()
    assert window["steps"] == list(range(100, 200))
    timed = client.get("/api/v1/runs/r/series/loss", params={"start_time": 1010, "end_time": 1012}).json()
    assert timed["steps"] == [10, 11, 12]
    r = client.get("/api/v1/runs/r/series/loss", params={"method": "none", "max_points": 10})
    assert r.status_code == 422 and "max_points" in r.json()["error"]["message"]
    # an out-of-order write (a late point before the last step) invalidates the cached series
    assert batch(client, "r", "late", [["loss", 12_345, -99.0, 1.0], ["loss", 30_000, 0.0, 1.0]]).json()["stored"] == 1
    batch(client, "r", "late2", [["loss", 25_000, -7.0, 1.0]])
    got = client.get("/api/v1/runs/r/series/loss", params={"start_step": 20_000, "method": "none"}).json()
    assert got["steps"] == [25_000, 30_000] and got["values"] == [-7.0, 0.0]


def test_policy_fires_on_goodness_and_the_decision_comes_back_until_acknowledged(client):
    client.put("/api/v1/runs/r", json={"policy": POLICY})
    g = lambda step, score: [["goodness", step, score, 1.0], ["goodness_grad_term", step, 0.01, 1.0],
                             ["goodness_sharpness_term", step, 0.05, 1.0], ["goodness_loss_term", step, 0.03, 1.0]]
    assert batch(client, "r", "1", g(100, 0.9)).json()["decisions"] == []  # one probe above C: not yet
    assert batch(client, "r", "2", g(200, 0.5)).json()["decisions"] == []  # streak broken
    assert batch(client, "r", "3", g(300, 0.9)).json()["decisions"] == []
    (d,) = batch(client, "r", "4", g(400, 0.95)).json()["decisions"]
    assert d["id"] == "r:policy:400" and d["step"] == 400 and d["source"] == "policy"
    assert d["goodness"] == 0.95 and d["grad_term"] == 0.01 and d["loss_term"] == 0.03
    assert d["action"] == POLICY["action"] and d["applied_step"] is None
    # at-least-once: it keeps coming back, in batch responses and polls, until acknowledged
    assert [x["id"] for x in batch(client, "r", "5", g(500, 0.99)).json()["decisions"]] == ["r:policy:400"]
    assert [x["id"] for x in client.get("/api/v1/runs/r/decisions/pending").json()["decisions"]] == ["r:policy:400"]
    r = batch(client, "r", "6", [["loss", 402, 0.1, 1.0]], acks=[{"decision_id": "r:policy:400", "applied_step": 401},
                                                               {"decision_id": "r:policy:1", "applied_step": 2}])
    assert r.json()["decisions"] == [] and r.json()["unknown_acks"] == ["r:policy:1"]
    (stored,) = client.get("/api/v1/runs/r/decisions").json()["decisions"]
    assert stored["applied_step"] == 401
    # max_decisions=1: later good probes never fire again, even after the agent re-registers
    client.put("/api/v1/runs/r", json={"policy": POLICY, "status": "running"})
    for i in range(7, 12):
        assert batch(client, "r", str(i), g(100 * i, 0.99)).json()["decisions"] == []
    assert len(client.get("/api/v1/runs/r/decisions").json()["decisions"]) == 1


def test_ack_endpoint_and_operator_decision(client):
    client.put("/api/v1/runs/r", json={})  # no policy: the collector takes no decisions itself
    batch(client, "r", "1", [["goodness", 10, 0.99, 1.0], ["goodness", 20, 0.99, 1.0], ["goodness", 30, 0.99, 1.0]])
    assert client.get("/api/v1/runs/r/decisions").json()["decisions"] == []
    r = client.post("/api/v1/runs/r/decisions", json={"action": {"phase": 2, "alpha": 0.2, "lr": 0.01}, "reason": "manual"})
    assert r.status_code == 201
    d = r.json()
    assert d["id"] == "r:operator:30" and d["step"] == 30 and d["source"] == "operator" and d["reason"] == "manual"
    assert d["goodness"] is None
    again = client.post("/api/v1/runs/r/decisions", json={"action": {"phase": 2, "alpha": 0.2, "lr": 0.01}})
    assert again.status_code == 200 and again.json()["id"] == d["id"]
    clash = client.post("/api/v1/runs/r/decisions", json={"action": {"phase": 1}})
    assert clash.status_code == 409 and "already has" in clash.json()["error"]["message"]
    assert [x["id"] for x in batch(client, "r", "2", []).json()["decisions"]] == ["r:operator:30"]
    acked = client.post(f"/api/v1/runs/r/decisions/{d['id']}/ack", json={"applied_step": 31})
    assert acked.status_code == 200 and acked.json()["applied_step"] == 31
    # the first acknowledgement wins
    assert client.post(f"/api/v1/runs/r/decisions/{d['id']}/ack", json={"applied_step": 99}).json()["applied_step"] == 31
    assert client.get("/api/v1/runs/r/decisions/pending").json()["decisions"] == []
    assert client.post("/api/v1/runs/r/decisions/nope/ack", json={"applied_step": 1}).status_code == 404


BAD = [
    ("post", "/api/v1/runs/r/batches", b"{not json", 400, "not valid JSON"),
    ("post", "/api/v1/runs/r/batches", b"", 400, "empty"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, NaN, 1]]}', 400, "NaN"),
    ("post", "/api/v1/runs/r/batches", b'[1, 2]', 422, "JSON object"),
    ("post", "/api/v1/runs/r/batches", b'{"points": []}', 422, "batch_id"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": 7, "points": []}', 422, "batch_id"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": {}}', 422, "points"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, 2]]}', 422, "points[0]"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, 2, 3], 5]}', 422, "points[1]"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [[3, 1, 2, 3]]}', 422, "metric"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["", 1, 2, 3]]}', 422, "metric"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1.5, 2, 3]]}', 422, "step"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", -1, 2, 3]]}', 422, "step"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 99999999999999999999, 2, 3]]}', 422, "step"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", true, 2, 3]]}', 422, "step"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, "big", 3]]}', 422, "value"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, true, 3]]}', 422, "value"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, 1, "now"]]}', 422, "wall_time"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [["loss", 1, 1, 2, -5]]}', 422, "rank"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [], "acks": [{"decision_id": 1}]}', 422, "acks[0]"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [], "extra": 1}', 422, "unknown fields"),
    ("post", "/api/v1/runs/nope/batches", b'{"batch_id": "x", "points": []}', 404, "no run named 'nope'"),
    ("put", "/api/v1/runs/r", b'{"status": "exploded"}', 422, "status"),
    ("put", "/api/v1/runs/r", b'{"policy": {"threshold": 7}}', 422, "threshold"),
    ("put", "/api/v1/runs/r", b'{"policy": {"thresh": 0.5}}', 422, "unknown policy fields"),
    ("put", "/api/v1/runs/r", b'{"config": [1]}', 422, "config"),
    ("put", "/api/v1/runs/" + "x" * 201, b"{}", 422, "1 to 200"),
    ("patch", "/api/v1/runs/ghost", b'{"status": "finished"}', 404, "no run named"),
    ("get", "/api/v1/runs/ghost", None, 404, "no run named"),
    ("get", "/api/v1/runs/ghost/series/loss", None, 404, "no run named"),
    ("get", "/api/v1/runs/r/series/loss?max_points=0", None, 422, "max_points"),
    ("get", "/api/v1/runs/r/series/loss?method=mean", None, 422, "method"),
    ("get", "/api/v1/runs/r/series/loss?start_step=abc", None, 422, "start_step"),
    ("get", "/api/v1/runs?status=sleeping", None, 422, "status"),
    ("post", "/api/v1/runs/r/decisions", b'{"action": {"phase": 3}}', 422, "phase"),
    ("post", "/api/v1/runs/r/decisions", b'{"action": {"phase": 2, "lr": "fast"}}', 422, "lr"),
    ("post", "/api/v1/runs/r/decisions/x/ack", b'{"applied_step": "later"}', 422, "applied_step"),
    ("get", "/api/v1/nothing-here", None, 404, "Not Found"),
    ("post", "/api/v1/runs/r/batches", b'{"batch_id": "x", "points": [' + b'["loss", 1, 2, 3],' * 10000 + b'[]]}', 413, "limit"),
]


@pytest.mark.parametrize("method,path,body,status,message", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_json_error_with_a_message(client, method, path, body, status, message):
    client.put("/api/v1/runs/r", json={})
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if body is not None else {}
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and message in error["message"]
    assert isinstance(error["code"], str) and isinstance(error["details"], list)


def test_oversized_body_is_refused_while_streaming_without_content_length(client):
    client.put("/api/v1/runs/r", json={})

    def chunks():
        yield b'{"batch_id": "x", "points": ['
        for _ in range(100):
            yield b'["loss", 1, 2, 3],' * 100
        yield b"[]]}"

    r = client.post("/api/v1/runs/r/batches", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_openapi_and_health(client):
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/runs/{run}/batches" in spec["paths"] and "/api/v1/runs/{run}/series/{metric}" in spec["paths"]
    assert client.get("/healthz").json() == {"status": "ok", "store": "ok"}


def test_store_unreachable_is_503_with_retry_after(tmp_path):
    import psycopg  # noqa: F401 - the driver must be there for the URL to parse

    from tests.collector.conftest import free_port

    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    store.close()
    dead = Store(f"postgresql://nobody@127.0.0.1:{free_port()}/none", migrate=False)
    with TestClient(create_app(store=dead, auth=False), base_url="http://127.0.0.1") as c:
        for r in (c.get("/healthz"), c.get("/api/v1/runs"), c.put("/api/v1/runs/r", json={})):
            assert r.status_code == 503 and r.headers["retry-after"].isdigit()
        assert c.get("/api/v1/runs").json()["error"]["code"] == "store_unavailable"
        assert "moxco_collector_store_up 0.0" in c.get("/metrics").text


@pytest.mark.parametrize("action", [{"phase": 2, "alpha": 5}, {"lr": -1}, {"beta": -3}, {"phase": 2, "x": [1]},
                                    {"phase": 2, "reset_inertia": False}, {"lr": "fast"}, {"phase": True}])
def test_an_action_the_decision_type_refuses_is_a_422_and_nothing_is_stored(client, action):
    """Operator decisions are validated by ``moxco.decision.Decision`` (``validate_action``), the one
    check the policy, the store and the agent use too."""
    client.put("/api/v1/runs/r", json={})
    r = client.post("/api/v1/runs/r/decisions", json={"action": action, "step": 3})
    assert r.status_code == 422, r.text
    assert "action" in r.json()["error"]["message"]
    assert client.get("/api/v1/runs/r/decisions").json()["decisions"] == []


def test_a_refused_point_is_a_422_naming_its_field_and_index_and_nothing_is_stored(client):
    """The batch's points go through ``moxco.wire.parse_points``: whole-string name rules (a trailing
    newline or a NUL is refused), the same answer on SQLite and PostgreSQL."""
    client.put("/api/v1/runs/r", json={})
    for bad in ("loss\n", "lo\x00ss"):
        r = batch(client, "r", "b", [["loss", 1, 0.5, 1.0], [bad, 2, 0.5, 1.0]])
        assert r.status_code == 422 and "points[1]" in r.json()["error"]["message"]
        assert r.json()["error"]["details"] == [{"field": "metric", "index": 1}]
    r = batch(client, "r", "b\x00", [["loss", 1, 0.5, 1.0]])
    assert r.status_code == 422 and r.json()["error"]["details"] == [{"field": "batch_id"}]
    assert client.get("/api/v1/runs/r").json()["metrics"] == []


def test_decisions_answer_in_the_decision_types_json_form_with_their_cause(client):
    """Every route answers a decision as ``Decision.to_json``: a policy decision carries the goodness,
    its terms and the policy that fired it; an operator decision who issued it and why; a refused
    one the agent's reason."""
    from moxco.decision import Decision

    client.put("/api/v1/runs/r", json={"policy": {**POLICY, "consecutive": 1}})
    (fired,) = batch(client, "r", "1", [["goodness", 10, 0.9, 1.0], ["goodness_loss_term", 10, 0.02, 1.0]]).json()[
        "decisions"]
    assert Decision.from_json(fired).to_json() == fired
    assert fired["policy"] == {**POLICY, "consecutive": 1} and fired["issued_by"] == "policy"
    assert fired["loss_term"] == 0.02 and fired["grad_term"] is None and fired["status"] == "pending"
    manual = client.post("/api/v1/runs/r/decisions", json={"action": {"lr": 0.01}, "reason": "lr too high"}).json()
    assert manual["issued_by"] == "anonymous" and manual["reason"] == "lr too high" and manual["step"] == 10
    refused = client.post(f"/api/v1/runs/r/decisions/{manual['id']}/ack",
                          json={"applied_step": 11, "rejected": "the optimizer has no commit()"}).json()
    assert refused["status"] == "rejected" and refused["rejected"] == "the optimizer has no commit()"
    listed = client.get("/api/v1/runs/r/decisions").json()["decisions"]
    assert [d["id"] for d in listed] == ["r:operator:10", "r:policy:10"] and listed[0] == refused


def test_the_catalogue_is_served_as_moxco_catalogue_to_json(client):
    import json

    from moxco import catalogue

    r = client.get("/api/v1/catalogue")
    assert r.status_code == 200 and r.json() == json.loads(json.dumps(catalogue.to_json()))
    assert {m["name"] for m in r.json()["metrics"]} == set(catalogue.names())


def test_prometheus_help_lines_come_from_the_catalogue(client):
    from moxco import catalogue

    client.put("/api/v1/runs/r", json={})
    batch(client, "r", "b", [["loss", 1, 0.5, 1.0], ["sharpness", 1, 2.0, 1.0], ["val_accuracy", 1, 0.9, 1.0]])
    text = client.get("/metrics").text
    for name in ("loss", "sharpness", "val_accuracy"):
        help_line = catalogue.help_text(name).replace("\\", r"\\").replace("\n", r"\n")
        assert f"# HELP moxco_{name} {help_line}\n" in text
    assert "DESIGN" not in text and "§" not in text
