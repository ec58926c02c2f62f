"""``moxco dashboards push`` against the Grafana contract server (tests/dashboards/grafana_contract.py):
idempotent, stores exactly the generated JSON, clear errors for auth, URL and version problems."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from grafana_client.elements.dashboard import Dashboard as DashboardElement

from moxco.cli import main as moxco_main
from moxco.dashboards import build
from moxco.dashboards.push import PushError, is_subset, postgres_datasource, push
from tests.dashboards.grafana_contract import GrafanaContractServer
from tests.servers import free_port

ADMIN, EDITOR, VIEWER = "glsa_admin_token", "glsa_editor_token", "glsa_viewer_token"
PROM_URL = "http://prometheus:9090"
PG_URL = "postgresql://grafana_reader:s3cret@postgres:5432/moxco"


@pytest.fixture
def grafana():
    with GrafanaContractServer({ADMIN: "Admin", EDITOR: "Editor", VIEWER: "Viewer"}) as server:
        yield server


def _push(server, token=ADMIN, **kw):
    kw.setdefault("prometheus_url", PROM_URL)
    kw.setdefault("postgres_url", PG_URL)
    return [str(o) for o in push(server.url, token, **kw)]


def test_first_push_creates_everything_and_stores_the_generated_json(grafana):
    assert _push(grafana) == [
        "folder moxco: created",
        "datasource moxco-prometheus: created",
        "datasource moxco-postgres: created",
        "dashboard moxco-live-run: created",
        "dashboard moxco-compare-runs: created",
    ]
    state = grafana.state
    assert [f["title"] for f in state.folders.values()] == ["moxco"]
    for name, factory in build.DASHBOARDS.items():
        committed = json.loads((build.JSON_DIR / name).read_text("utf-8"))
        entry = state.dashboards[committed["uid"]]
        stored = {k: v for k, v in entry["dashboard"].items() if k not in ("id", "version")}
        assert stored == committed  # exactly the generated JSON, nothing lost or changed
        assert entry["folderUid"] == "moxco"
        assert entry["dashboard"]["version"] == 1
    prom = state.datasources[build.PROMETHEUS_UID]
    assert (prom["type"], prom["url"], prom["access"]) == ("prometheus", PROM_URL, "proxy")
    pg = state.datasources[build.POSTGRES_UID]
    assert (pg["type"], pg["url"], pg["user"]) == (build.POSTGRES_TYPE, "postgres:5432", "grafana_reader")
    assert pg["jsonData"]["database"] == "moxco"
    assert state.secrets[build.POSTGRES_UID] == {"password": "s3cret"}


def test_second_push_is_idempotent(grafana):
    _push(grafana)
    writes = len(grafana.state.writes())
    assert _push(grafana) == [
        "folder moxco: unchanged",
        "datasource moxco-prometheus: unchanged",
        "datasource moxco-postgres: unchanged",
        "dashboard moxco-live-run: unchanged",
        "dashboard moxco-compare-runs: unchanged",
    ]
    assert len(grafana.state.writes()) == writes  # not a single write
    assert all(e["dashboard"]["version"] == 1 for e in grafana.state.dashboards.values())


def test_a_dashboard_edited_in_grafana_is_restored(grafana):
    _push(grafana)
    stored = grafana.state.dashboards[build.LIVE_UID]["dashboard"]
    stored["panels"][1]["title"] = "edited in the UI"
    stored["version"] = 7
    assert "dashboard moxco-live-run: updated" in _push(grafana)
    restored = grafana.state.dashboards[build.LIVE_UID]["dashboard"]
    assert restored["panels"][1]["title"] == "Step" and restored["version"] == 8
    assert "dashboard moxco-live-run: unchanged" in _push(grafana)


def test_a_dashboard_in_another_folder_is_moved(grafana):
    _push(grafana)
    assert _push(grafana, folder="training")[0] == "folder training: created"
    assert grafana.state.dashboards[build.COMPARE_UID]["folderUid"] == "training"


def test_existing_folder_is_reused_by_title(grafana):
    grafana.state.folders["abc123"] = {"id": 99, "uid": "abc123", "title": "moxco", "url": "/dashboards/f/abc123/"}
    assert _push(grafana)[0] == "folder moxco: unchanged"
    assert grafana.state.dashboards[build.LIVE_UID]["folderUid"] == "abc123"


def test_version_conflict_is_reported_and_overwrite_resolves_it(grafana, monkeypatch):
    _push(grafana)
    grafana.state.dashboards[build.LIVE_UID]["dashboard"]["title"] = "renamed in the UI"
    original = DashboardElement.get_dashboard

    def read_then_someone_saves(self, uid):
        answer = original(self, uid)
        grafana.state.dashboards[uid]["dashboard"]["version"] += 1  # a concurrent save in Grafana
        return answer

    monkeypatch.setattr(DashboardElement, "get_dashboard", read_then_someone_saves)
    with pytest.raises(PushError) as err:
        _push(grafana)
    assert "version conflict" in str(err.value) and "412" in str(err.value) and "--overwrite" in str(err.value)
    assert grafana.state.dashboards[build.LIVE_UID]["dashboard"]["title"] == "renamed in the UI"  # untouched

    assert "dashboard moxco-live-run: updated" in _push(grafana, overwrite=True)
    assert grafana.state.dashboards[build.LIVE_UID]["dashboard"]["title"] == "moxco · live run"


def test_changed_datasource_is_updated_and_secrets_kept(grafana):
    _push(grafana)
    out = _push(grafana, prometheus_url="http://prometheus.monitoring:9090/")
    assert "datasource moxco-prometheus: updated" in out and "datasource moxco-postgres: unchanged" in out
    assert grafana.state.datasources[build.PROMETHEUS_UID]["url"] == "http://prometheus.monitoring:9090"
    # a new password cannot be compared (Grafana never returns it): only sent on request
    assert "datasource moxco-postgres: unchanged" in _push(grafana, postgres_url=PG_URL.replace("s3cret", "n3w"))
    assert grafana.state.secrets[build.POSTGRES_UID] == {"password": "s3cret"}
    assert "datasource moxco-postgres: updated" in _push(
        grafana, postgres_url=PG_URL.replace("s3cret", "n3w"), update_secrets=True)
    assert grafana.state.secrets[build.POSTGRES_UID] == {"password": "n3w"}


def test_datasource_name_taken_by_another_uid(grafana):
    grafana.state.datasources["other"] = {"id": 50, "uid": "other", "name": "moxco Prometheus", "type": "prometheus",
                                          "version": 1, "jsonData": {}}
    with pytest.raises(PushError, match=r"conflict while trying to create datasource moxco-prometheus \(409"):
        _push(grafana)


def test_datasources_are_optional(grafana):
    assert _push(grafana, prometheus_url=None, postgres_url=None) == [
        "folder moxco: created", "dashboard moxco-live-run: created", "dashboard moxco-compare-runs: created"]
    assert grafana.state.datasources == {}


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["glsa_wrong", ""])
def test_bad_or_missing_token(grafana, token):
    with pytest.raises(PushError) as err:
        _push(grafana, token=token)
    message = str(err.value)
    if token:
        assert "rejected the token (401 Unauthorized)" in message and "--grafana-token" in message
    else:
        assert "no Grafana token" in message
    assert grafana.state.writes() == []


def test_viewer_token_is_forbidden_to_write(grafana):
    with pytest.raises(PushError) as err:
        _push(grafana, token=VIEWER, prometheus_url=None, postgres_url=None)
    assert "may not create folder 'moxco' (403 Forbidden" in str(err.value)
    assert "Editor role" in str(err.value)


def test_editor_token_cannot_write_datasources(grafana):
    with pytest.raises(PushError) as err:
        _push(grafana, token=EDITOR)
    assert "may not create datasource moxco-prometheus (403" in str(err.value) and "Admin" in str(err.value)


def test_connection_refused():
    with pytest.raises(PushError) as err:
        push(f"http://127.0.0.1:{free_port()}", ADMIN, timeout=3)
    assert "cannot connect to Grafana" in str(err.value) and "is the URL right" in str(err.value)


class _NotGrafana(BaseHTTPRequestHandler):
    body = b"<html>hello</html>"
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html" if self.body.startswith(b"<") else "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, body", [
    (200, b"<html>hello</html>"),                        # some web page
    (404, b'{"error": {"status": 404}}'),                # the moxco collector, say
    (200, b'{"status": "success", "data": []}'),         # a JSON API that is not Grafana
])
def test_not_grafana(status, body):
    handler = type("H", (_NotGrafana,), {"status": status, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(PushError, match="does not look like Grafana"):
            push(f"http://127.0.0.1:{server.server_address[1]}", ADMIN, timeout=3)
    finally:
        server.shutdown()
        server.server_close()


def test_bad_urls():
    with pytest.raises(PushError, match="--grafana must be an http"):
        push("localhost:3000", ADMIN)
    with pytest.raises(PushError, match="--store must be the PostgreSQL store"):
        postgres_datasource("mysql://u@h/db")


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_push_twice(grafana, capsys, monkeypatch):
    monkeypatch.setenv("MOXCO_GRAFANA_TOKEN", ADMIN)  # the token from the environment
    argv = ["dashboards", "push", "--grafana", grafana.url, "--prometheus-url", PROM_URL, "--store", PG_URL]
    assert moxco_main(argv) == 0
    first = capsys.readouterr()
    assert first.out.splitlines() == ["folder moxco: created", "datasource moxco-prometheus: created",
                                      "datasource moxco-postgres: created", "dashboard moxco-live-run: created",
                                      "dashboard moxco-compare-runs: created"]
    assert first.err == ""
    assert moxco_main(argv) == 0
    assert all(line.endswith(": unchanged") for line in capsys.readouterr().out.splitlines())


def test_cli_warns_about_missing_datasources_and_fails_clearly(grafana, capsys, monkeypatch):
    monkeypatch.delenv("MOXCO_STORE_URL", raising=False)  # else its PostgreSQL store would be the datasource
    assert moxco_main(["dashboards", "push", "--grafana", grafana.url, "--grafana-token", ADMIN]) == 0
    err = capsys.readouterr().err
    assert "no datasource 'moxco-prometheus'" in err and "--prometheus-url" in err
    assert "no datasource 'moxco-postgres'" in err and "--store" in err

    assert moxco_main(["dashboards", "push", "--grafana", grafana.url, "--grafana-token", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: Grafana at ")


def test_is_subset():
    assert is_subset({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2, "c": 3}], "d": 4})
    assert not is_subset({"a": [1]}, {"a": [1, 2]})
    assert not is_subset({"a": True}, {"a": 1})
    assert not is_subset({"a": 1}, {})
    model = build.to_dict(build.live_run())
    stored = copy.deepcopy(model) | {"id": 3, "version": 2}
    assert is_subset(model, stored)
    stored["panels"][5]["targets"][0]["expr"] = "up"
    assert not is_subset(model, stored)
