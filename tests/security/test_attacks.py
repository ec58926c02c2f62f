"""The collector tried as an attacker would, with a token of each scope and with none, on SQLite and
on a real PostgreSQL: each test is one way in that used to work (cardinality from invented HTTP
methods, another trainer's learning rate moved through its policy, out-of-range actions, configs
and run lists without bound, metric names deciding the exposition's size, cross-site writes and
DNS rebinding without auth, two jobs writing one run, stores answering differently, configs read
through ``PATCH``, a page loading scripts from a CDN), and what the collector answers now."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from moxco.collector.api import create_app
from moxco.collector.store import Store
MAX_CONFIG_BYTES = 256 * 1024  # the documented limit of a run's config (docs/security.md)
from tests.figures import figure

POLICY = {"threshold": 0.85, "min_step": 0, "consecutive": 1, "cooldown": 0, "max_decisions": 1, "lag": 2,
          "action": {"phase": 2, "alpha": 0.1, "beta": 0.1}}
LOOPBACK = "http://127.0.0.1"


@pytest.fixture
def secured(store_url):
    """The app with auth on, over SQLite and PostgreSQL; ``c.bearer[who]`` headers for two ingest
    tokens (``trainer``, ``intruder``) and one of each other scope."""
    store = Store(store_url)
    app = create_app(store=store, migrate=False)
    bearer = {}
    for who, scopes in (("trainer", ["ingest"]), ("intruder", ["ingest"]), ("read", ["read"]),
                        ("decide", ["decide"]), ("admin", ["admin"])):
        bearer[who] = {"Authorization": f"Bearer {store.create_token(who, scopes)[1]}"}
    with TestClient(app, raise_server_exceptions=False) as c:
        c.bearer, c.store = bearer, store
        yield c
    store.close()


@pytest.fixture
def open_client(store_url):
    """The app without auth (``--no-auth``), addressed as http://127.0.0.1."""
    app = create_app(store_url, auth=False)
    with TestClient(app, raise_server_exceptions=False, base_url=LOOPBACK) as c:
        c.store = app.state.store
        yield c
    app.state.store.close()


def exposition(c, headers=None):
    return c.get("/metrics", headers=headers or {}).text


# --- 1: the request histogram's labels ---------------------------------------------------------------


def test_invented_http_methods_and_paths_fold_into_one_label_each(open_client):
    """200 requests with methods M000…M199 and random paths add no series: unknown methods are
    ``other``, unmatched routes ``unmatched``; /metrics does not grow with them."""
    c = open_client
    for i in range(200):
        if i == 10:
            exposition(c)  # the scrape's own series
            before = exposition(c)
        c.request(f"M{i:03d}", f"/nowhere/{i}")
        c.request(f"M{i:03d}", "/api/v1/runs")
    after = exposition(c)
    methods = set(re.findall(r'moxco_collector_request_duration_seconds_count\{method="([^"]*)"', after))
    routes = set(re.findall(r'moxco_collector_request_duration_seconds_count\{[^}]*route="([^"]*)"', after))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert "other" in methods and "unmatched" in routes and not any("nowhere" in r for r in routes)
    series = lambda text: {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}  # noqa: E731
    assert series(after) == series(before)
    figure("400 requests with invented HTTP methods and paths", requests=400,
           metrics_bytes_before=len(before), metrics_bytes_after=len(after), method_labels=len(methods))


# --- 3 and 12: who may write a run, and what a write answers ---------------------------------------------


def test_an_ingest_token_cannot_move_another_trainers_learning_rate(secured):
    """The attack: with its own ``ingest`` token, register a hair-trigger policy on the victim's run
    and send it one goodness point. Refused (403) at every step; the victim's policy and decisions
    stay its own, and a policy decision records the goodness and policy that fired it."""
    c = secured
    assert c.put("/api/v1/runs/victim", json={"policy": POLICY}, headers=c.bearer["trainer"]).status_code == 200
    hostile = {"policy": {"threshold": 1e-9, "consecutive": 1, "action": {"phase": 2, "lr": 5.0}}}
    for method, path, body in (("PUT", "/api/v1/runs/victim", hostile),
                               ("PATCH", "/api/v1/runs/victim", hostile),
                               ("POST", "/api/v1/runs/victim/batches",
                                {"batch_id": "x", "points": [["goodness", 5, 0.99, 1.0]]}),
                               ("GET", "/api/v1/runs/victim/decisions/pending", None),
                               ("POST", "/api/v1/runs/victim/decisions/victim:policy:5/ack", {"applied_step": 5}),
                               ("PUT", "/api/v1/runs/victim/policy", hostile)):
        r = c.request(method, path, json=body, headers=c.bearer["intruder"])
        assert r.status_code == 403, (method, path, r.text)
    assert c.get("/api/v1/runs/victim", headers=c.bearer["read"]).json()["policy"] == POLICY
    assert c.store.decisions("victim") == []
    # the victim's own trainer writes, and its policy's decision says why it fired
    r = c.post("/api/v1/runs/victim/batches", headers=c.bearer["trainer"],
               json={"batch_id": "b", "points": [["goodness", 7, 0.9, 1.0], ["goodness_grad_term", 7, 0.01, 1.0]]})
    (fired,) = r.json()["decisions"]
    assert fired["action"] == POLICY["action"] and fired["goodness"] == 0.9 and fired["grad_term"] == 0.01
    assert fired["policy"] == POLICY and fired["source"] == "policy"
    # changing the policy of a run one did not register is an operator's act: decide (or admin)
    r = c.put("/api/v1/runs/victim/policy", json={"policy": {**POLICY, "threshold": 0.9}}, headers=c.bearer["decide"])
    assert r.status_code == 200 and r.json()["policy"]["threshold"] == 0.9
    operator = c.post("/api/v1/runs/victim/decisions", json={"action": {"lr": 0.01}, "step": 8},
                      headers=c.bearer["decide"]).json()
    assert operator["issued_by"] == "decide" and operator["source"] == "operator"


def test_runs_without_an_owner_are_written_by_admin_tokens_only(secured):
    """A run registered by an admin token (or without auth, or before owners were recorded) has no
    owner: no ``ingest`` token writes to it."""
    c = secured
    assert c.put("/api/v1/runs/shared", json={}, headers=c.bearer["admin"]).status_code == 200
    r = c.post("/api/v1/runs/shared/batches", json={"batch_id": "b", "points": [["loss", 1, 1.0, 1.0]]},
               headers=c.bearer["trainer"])
    assert r.status_code == 403 and "registered by another token" in r.json()["error"]["message"]
    r = c.post("/api/v1/runs/shared/batches", json={"batch_id": "b", "points": [["loss", 1, 1.0, 1.0]]},
               headers=c.bearer["admin"])
    assert r.status_code == 200 and r.json()["stored"] == 1


def test_a_write_answers_the_runs_summary_never_its_config(secured):
    """``PATCH {}`` (or any write) by an ``ingest`` token answers name, status, timestamps, last
    step, policy and key hyper-parameters: the config, optimizer and metric list take ``read``."""
    c = secured
    secret = {"dataset": "s3://private/bucket", "api_key": "hunter2"}
    r = c.put("/api/v1/runs/mine", json={"config": secret, "optimizer": {"class": "MoXCo", "lr": 0.05, "note": "x"}},
              headers=c.bearer["trainer"])
    assert r.status_code == 200
    for method in ("PUT", "PATCH"):
        got = c.request(method, "/api/v1/runs/mine", json={}, headers=c.bearer["trainer"]).json()
        assert "config" not in got and "optimizer" not in got and "metrics" not in got and "hunter2" not in str(got)
        assert got["name"] == "mine" and got["status"] == "running"
        assert got["hyperparameters"] == {"class": "MoXCo", "lr": 0.05}
    assert c.get("/api/v1/runs/mine", headers=c.bearer["trainer"]).status_code == 403
    assert c.get("/api/v1/runs/mine", headers=c.bearer["read"]).json()["config"] == secret


# --- 4: actions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [{"alpha": 5}, {"lr": -1}, {"lr": 1e308}, {"lr": 50}, {"beta": -3},
                                    {"reset_inertia": False}, {"lr": "fast", "x": [1]}, {"phase": 3}])
def test_every_entry_refuses_an_out_of_range_action_with_422(open_client, action):
    """The operator route, a run's policy (``PUT /runs/{run}`` and ``PUT …/policy``): one validation
    (``moxco.decision.validate_action``; ``lr`` in (0, 10])."""
    c = open_client
    c.put("/api/v1/runs/r", json={})
    r = c.post("/api/v1/runs/r/decisions", json={"action": action, "step": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_decision", r.text
    for path in ("/api/v1/runs/r", "/api/v1/runs/r/policy"):
        r = c.put(path, json={"policy": {**POLICY, "action": action}})
        assert r.status_code == 422 and "action" in r.json()["error"]["message"], (path, r.text)
    assert c.store.decisions("r") == [] and c.store.run("r").policy is None


@pytest.mark.parametrize("policy", [{"threshold": "x"}, {"threshold": None}, {"threshold": [1]}, "x", [1]])
def test_a_policy_of_the_wrong_shape_is_a_422_not_a_500(open_client, policy):
    c = open_client
    r = c.put("/api/v1/runs/r", json={"policy": policy})
    assert r.status_code == 422, r.text


# --- 5: configs and the run list -------------------------------------------------------------------------


def test_a_runs_config_is_bounded_once_merged_413_saying_the_limit(open_client):
    c = open_client
    part = {f"k{i}": "x" * 1000 for i in range(100)}  # ~100 KB a PUT
    assert c.put("/api/v1/runs/r", json={"config": part}).status_code == 200
    assert c.put("/api/v1/runs/r", json={"config": {f"j{i}": "y" * 1000 for i in range(100)}}).status_code == 200
    r = c.put("/api/v1/runs/r", json={"config": {f"h{i}": "z" * 1000 for i in range(100)}})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert f"the limit is {MAX_CONFIG_BYTES} bytes" in r.json()["error"]["message"]
    r = c.put("/api/v1/runs/r", json={"optimizer": {"blob": "x" * (MAX_CONFIG_BYTES + 1)}})
    assert r.status_code == 413
    assert len(str(c.get("/api/v1/runs/r").json()["config"])) < MAX_CONFIG_BYTES


def test_listing_runs_pages_in_the_database_and_never_reads_configs(store_url):
    """120 runs with 200 KB configs (24 MB): a one-row page, filtered or not, allocates a few
    hundred KB at most (it used to read every row and config, then page in Python), and answers
    summaries. Memory measured with tracemalloc around the store's call."""
    store = Store(store_url)
    try:
        big = {f"k{i}": "v" * 1000 for i in range(200)}
        for i in range(120):
            store.put_run(f"run-{i:03d}", config={**big, "i": i}, optimizer={"class": "SGD", "lr": 0.1})
        store.list_runs(limit=1)  # warm: the first query compiles statements
        peaks = {}
        for what, kwargs in (("one-row page", {"limit": 1}), ("glob that matches nothing", {"name": "nothing-*",
                                                                                           "limit": 1}),
                             ("a page of 100", {"limit": 100}), ("glob *-05?", {"name": "*-05?"})):
            tracemalloc.start()
            total, page = store.list_runs(**kwargs)
            peaks[what] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert all(not hasattr(run, "config") for run in page)
        assert total == 10 and [r.name for r in page][:2] == ["run-059", "run-058"]
        assert store.list_runs(name="nothing-*", limit=1)[0] == 0
        assert page[0].hyperparameters == {"class": "SGD", "lr": 0.1}
        figure(f"run list over 120 runs × 200 KB configs ({store.dialect})", configs_mb=24,
               **{f"{k.replace(' ', '_')}_peak_kb": v // 1024 for k, v in peaks.items()})
        assert max(peaks.values()) < 2 * 2**20, peaks  # a config alone is 200 KB; all of them 24 MB
    finally:
        store.close()


# --- 6: the exposition's size ---------------------------------------------------------------------------------


def test_metric_names_exposed_per_run_are_bounded_and_what_is_left_out_is_counted(store_url):
    """3,000 invented names in one run: every catalogue metric is exposed, of the others the first
    50 by name (``metrics_per_run=50``), and ``moxco_run_metrics_left_out`` says how many were not."""
    app = create_app(store_url, auth=False, metrics_per_run=50, metrics_cache_s=0)
    with TestClient(app, base_url=LOOPBACK) as c:
        c.put("/api/v1/runs/r", json={})
        points = [[f"user_metric_{i:05d}", 1, 1.0, 1.0] for i in range(3000)]
        points += [["loss", 1, 0.5, 1.0], ["goodness", 1, 0.5, 1.0], ["Not-A-Prometheus-Name", 1, 1.0, 1.0]]
        assert c.post("/api/v1/runs/r/batches", json={"batch_id": "b", "points": points}).status_code == 200
        text = c.get("/metrics").text
        families = {f.name for f in text_string_to_metric_families(text)}
        user = sorted(n for n in families if n.startswith("moxco_user_metric_"))
        assert user == [f"moxco_user_metric_{i:05d}" for i in range(49)]  # 50 names: the odd one sorts first
        assert {"moxco_loss", "moxco_goodness"} <= families
        assert 'moxco_run_metrics_left_out{run="r"} 2952.0' in text  # 3001 - 50 over the bound, +1 not a name
        assert len(text) < 60_000
        assert len(c.get("/api/v1/runs/r").json()["metrics"]) == 3003  # all stored, all served by the API
    app.state.store.close()


# --- 7: cross-site writes and DNS rebinding without auth --------------------------------------------------


def test_writes_take_json_bodies_only(open_client):
    """A cross-origin ``text/plain`` (or form) POST needs no CORS preflight: every write refuses any
    body that is not ``application/json`` (415), so a web page cannot write a decision."""
    c = open_client
    c.put("/api/v1/runs/r", json={})
    writes = [("POST", "/api/v1/runs/r/decisions", b'{"action": {"phase": 2, "lr": 5}}'),
              ("POST", "/api/v1/runs/r/batches", b'{"batch_id": "b", "points": [["loss", 1, 1.0, 1.0]]}'),
              ("PUT", "/api/v1/runs/r", b"{}"), ("PATCH", "/api/v1/runs/r", b'{"status": "finished"}'),
              ("PUT", "/api/v1/runs/r/policy", b'{"policy": null}'),
              ("POST", "/api/v1/runs/r/decisions/r:operator:1/ack", b'{"applied_step": 1}')]
    for method, path, body in writes:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            r = c.request(method, path, content=body, headers={"Content-Type": kind} if kind else {})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (path, kind)
    assert c.store.decisions("r") == [] and c.store.run("r").status == "running"
    r = c.post("/api/v1/runs/r/decisions", content=b'{"action": {"phase": 2}}',
               headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201


def test_without_auth_a_foreign_host_or_origin_is_refused(open_client):
    c = open_client
    c.put("/api/v1/runs/r", json={})
    r = c.get("/api/v1/runs/r", headers={"Host": "attacker-rebound.example"})
    assert r.status_code == 403 and "DNS" in r.json()["error"]["message"]
    r = c.post("/api/v1/runs/r/decisions", json={"action": {"phase": 2}}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert c.get("/metrics", headers={"Host": "attacker-rebound.example"}).status_code == 403
    assert c.get("/api/v1/runs/r", headers={"Host": "localhost:8000"}).status_code == 200


# --- 10: one writer per run -----------------------------------------------------------------------------------


def test_a_second_live_writer_session_is_refused_until_the_first_ends_or_goes_silent(open_client):
    c = open_client
    assert c.put("/api/v1/runs/r", json={"session": "job-a"}).status_code == 200
    ok = {"batch_id": "a1", "points": [["loss", 1, 1.0, 1.0]], "session": "job-a"}
    assert c.post("/api/v1/runs/r/batches", json=ok).status_code == 200
    r = c.put("/api/v1/runs/r", json={"session": "job-b", "config": {"mixed": True}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "run_busy" and "job-a" in r.json()["error"]["message"]
    r = c.post("/api/v1/runs/r/batches", json={"batch_id": "b1", "points": [["loss", 2, 9.0, 1.0]], "session": "job-b"})
    assert r.status_code == 409
    assert c.store.series("r", "loss")[1].tolist() == [1.0] and "mixed" not in c.store.run("r").config
    # the first job ends: the run is free for the next
    assert c.patch("/api/v1/runs/r", json={"status": "finished", "session": "job-a"}).status_code == 200
    assert c.put("/api/v1/runs/r", json={"session": "job-b", "status": "running"}).status_code == 200
    assert c.post("/api/v1/runs/r/batches", json={"batch_id": "a2", "points": [], "session": "job-a"}).status_code == 409
    # a session silent for longer than the stale time no longer holds the run
    c.store.session_stale_after = 0.0
    assert c.post("/api/v1/runs/r/batches", json={"batch_id": "a3", "points": [], "session": "job-a"}).status_code == 200


# --- 11: the same answer on both stores --------------------------------------------------------------------------


def test_nul_bytes_and_negative_zero_get_the_same_answer_on_both_stores(open_client):
    c = open_client
    c.put("/api/v1/runs/r", json={})
    for path, body in (("/api/v1/runs/r", {"config": {"a": "x\u0000y"}}), ("/api/v1/runs/r", {"config": {"k\u0000": 1}}),
                       ("/api/v1/runs/r", {"optimizer": {"class": "\u0000"}}),
                       ("/api/v1/runs/r/batches", {"batch_id": "b\u0000", "points": []}),
                       ("/api/v1/runs/r/batches", {"batch_id": "b", "points": [["lo\u0000ss", 1, 1.0, 1.0]]}),
                       ("/api/v1/runs/r/batches", {"batch_id": "b", "points": [], "session": "s\u0000"}),
                       ("/api/v1/runs/r/decisions", {"action": {"phase": 2}, "reason": "a\u0000"})):
        r = c.request("POST" if path.endswith(("batches", "decisions")) else "PUT", path, json=body)
        assert r.status_code == 422, (path, body, r.text)
    for path in ("/api/v1/runs/r/series/lo%00ss", "/api/v1/runs/r/series/loss%0A", "/api/v1/runs?name=a%00b*"):
        r = c.get(path)
        assert r.status_code == 422, (path, r.text)
    assert c.post("/api/v1/runs/r/decisions/r:x%00/ack", json={"applied_step": 1}).status_code == 404
    r = c.post("/api/v1/runs/r/batches", json={"batch_id": "z", "points": [["w", 1, -0.0, -0.0]]})
    assert r.status_code == 200
    got = c.get("/api/v1/runs/r/series/w", params={"method": "none"}).text
    assert '"values":[0.0]' in got and '"wall_times":[0.0]' in got  # no -0.0 anywhere


# --- Swagger UI and the pages' Content-Security-Policy -----------------------------------------------------------


def test_api_docs_are_off_by_default_and_every_html_page_has_a_csp(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with TestClient(create_app(url, auth=False), base_url=LOOPBACK) as c:
        r = c.get("/api/v1/docs")
        assert r.status_code == 404 and "--api-docs" in r.json()["error"]["message"]
        for page in ("/", "/runs/r", "/runs/?name=r", "/static/index.html", "/static/run.html"):
            r = c.get(page)
            assert r.status_code == 200 and "text/html" in r.headers["content-type"], page
            assert "script-src 'self'" in r.headers["Content-Security-Policy"], page
            assert "http" not in r.headers["Content-Security-Policy"], page
    with TestClient(create_app(url, auth=False, api_docs=True), base_url=LOOPBACK) as c:
        r = c.get("/api/v1/docs")
        csp = r.headers["Content-Security-Policy"]
        assert r.status_code == 200 and "default-src 'none'" in csp and "'sha256-" in csp
        scripts = re.findall(r'<script src="([^"]+)"', r.text)
        assert scripts and all(s.startswith("https://cdn.jsdelivr.net/") for s in scripts)
        assert "fastapi.tiangolo.com" not in r.text
