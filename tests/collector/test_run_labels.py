"""A run's tags and note, the run list's filters (name, status, tag, config value), and deleting a
run with everything stored for it, on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from moxco.collector.api import create_app
from moxco.collector.store import NotFoundError, Store, StoreError
from moxco.decision import Decision


@pytest.fixture
def client(store_url):
    store = Store(store_url)
    with TestClient(create_app(store=store, auth=False, migrate=False), base_url="http://127.0.0.1") as c:
        yield c, store
    store.close()


def _names(c, **params):
    r = c.get("/api/v1/runs", params=params)
    assert r.status_code == 200, r.text
    return [run["name"] for run in r.json()["runs"]]


def test_tags_and_note_are_set_replaced_and_cleared_by_patch(client):
    c, store = client
    c.put("/api/v1/runs/r", json={"config": {"optimizer": "SGD"}})
    run = c.patch("/api/v1/runs/r", json={"tags": ["baseline", " lr-sweep ", "baseline"], "note": "first try\nwith SGD"})
    assert run.status_code == 200
    assert run.json()["tags"] == ["baseline", "lr-sweep"] and run.json()["note"] == "first try\nwith SGD"
    # registering again (an agent restarting) keeps them; a PATCH of the status too
    c.put("/api/v1/runs/r", json={"config": {"optimizer": "SGD"}})
    c.patch("/api/v1/runs/r", json={"status": "finished"})
    got = c.get("/api/v1/runs/r").json()
    assert got["tags"] == ["baseline", "lr-sweep"] and got["note"] == "first try\nwith SGD"
    assert got["status"] == "finished" and got["config"] == {"optimizer": "SGD"}  # labels are not config
    assert store.run("r").tags == ["baseline", "lr-sweep"]
    c.patch("/api/v1/runs/r", json={"tags": ["kept"]})
    assert c.get("/api/v1/runs/r").json()["note"] == "first try\nwith SGD"
    c.patch("/api/v1/runs/r", json={"tags": None, "note": None})
    got = c.get("/api/v1/runs/r").json()
    assert got["tags"] == [] and got["note"] is None
    for body in ({"tags": "one"}, {"tags": [""]}, {"tags": ["a\nb"]}, {"tags": ["x" * 65]}, {"tags": ["t"] * 33},
                 {"note": "x" * 1001}, {"note": "bell\x07"}, {"tags": [1]}):
        r = c.patch("/api/v1/runs/r", json=body)
        assert r.status_code == 422, (body, r.text)
    assert c.patch("/api/v1/runs/nope", json={"tags": ["a"]}).status_code == 404
    with pytest.raises(StoreError):
        store.put_run("r", tags=["a"] * 40)


def test_the_run_list_filters_by_name_status_tag_and_config_values(client):
    c, store = client
    store.put_run("sgd-1", config={"optimizer": "SGD", "hyperparameters": {"lr": 0.1, "nesterov": True},
                                   "policy": {"threshold": 0.85}}, tags=["sweep", "baseline"])
    store.put_run("sgd-2", config={"optimizer": "SGD", "hyperparameters": {"lr": 0.01, "nesterov": False}},
                  tags=["sweep"])
    store.put_run("adam", config={"optimizer": "Adam", "hyperparameters": {"lr": 0.001}, "note": "0.1"},
                  tags=["Sweep"], status="finished")
    store.put_run("odd", config={"optimizer": ["not", "a", "string"], "hyperparameters": "lr=0.1"})
    assert _names(c, tag="sweep") == ["sgd-2", "sgd-1"]  # newest first; tags are case-sensitive
    assert _names(c, tag=["sweep", "baseline"]) == ["sgd-1"]
    assert _names(c, config="optimizer=SGD") == ["sgd-2", "sgd-1"]
    assert _names(c, config="hyperparameters.lr=0.1") == ["sgd-1"]  # a number equals a number
    assert _names(c, config="hyperparameters.lr=1e-3") == ["adam"]
    assert _names(c, config="note=0.1") == []  # the string "0.1" is not the number 0.1
    assert _names(c, config="hyperparameters.nesterov=false") == ["sgd-2"]
    assert _names(c, config="policy.threshold=0.85") == ["sgd-1"]
    assert _names(c, config=["optimizer=SGD", "hyperparameters.lr=0.01"], tag="sweep") == ["sgd-2"]
    assert _names(c, config="optimizer=SGD", status="finished") == []
    assert _names(c, name="sgd-*", config="hyperparameters.lr=0.1") == ["sgd-1"]
    assert _names(c, config="missing.key=1") == []
    listed = c.get("/api/v1/runs", params={"tag": "baseline"}).json()["runs"][0]
    assert listed["tags"] == ["sweep", "baseline"] and listed["note"] is None
    for bad in ({"config": "no-equals"}, {"config": "=1"}, {"config": "a..b=1"}, {"config": "x" * 101},
                {"tag": ["t"] * 17}):
        r = c.get("/api/v1/runs", params=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", (bad, r.text)


def _rows(store: Store, run_id: int) -> dict:
    tables = ["series_blocks", "latest_points", "decisions", "batches",
              "point_chunks" if store.dialect == "postgresql" else "metric_points"]
    with store.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t} WHERE run_id = :r"), {"r": run_id}).scalar()
                for t in tables}


def test_deleting_a_run_deletes_its_points_summaries_decisions_and_batches(client):
    c, store = client
    store.put_run("keep")
    store.ingest("keep", [(s, "loss", 1.0, 1.0) for s in range(5)])
    store.put_run("gone", policy={"threshold": 0.5, "consecutive": 1})
    store.ingest("gone", [(s, "loss", float(s), time.time()) for s in range(3000)], batch_id="b1")
    store.ingest("gone", [(s, "goodness", 0.9, time.time()) for s in range(3)], batch_id="b2")
    store.add_decision("gone", Decision(2999, {"phase": 2}, source="operator"))
    assert store.series_columns("gone", "loss")[0].size == 3000  # cached in this process
    with store.engine.connect() as conn:
        gone_id = conn.execute(text("SELECT id FROM runs WHERE name = 'gone'")).scalar()
    before = _rows(store, gone_id)
    assert all(before.values()), before
    decisions = len(store.decisions("gone"))
    assert decisions == 2  # the operator's and the policy's
    r = c.delete("/api/v1/runs/gone")
    assert r.status_code == 200 and r.json() == {"run": "gone", "deleted": {"points": 3003, "decisions": 2}}
    assert _rows(store, gone_id) == {t: 0 for t in before}
    assert c.get("/api/v1/runs/gone").status_code == 404 and c.delete("/api/v1/runs/gone").status_code == 404
    with pytest.raises(NotFoundError):
        store.series_columns("gone", "loss")
    assert store.series("keep", "loss")[0].tolist() == list(range(5))  # the other run is untouched
    # a run registered again under the same name (SQLite may even reuse the id) starts empty: no
    # stale series from the deleted run's cache
    store.put_run("gone")
    store.ingest("gone", [(0, "loss", 42.0, 1.0)])
    steps, values, _ = store.series_columns("gone", "loss")
    assert steps.tolist() == [0] and values.tolist() == [42.0]
    assert [d.step for d in store.decisions("gone")] == []
