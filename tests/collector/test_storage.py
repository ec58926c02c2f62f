"""The storage layer on SQLite: migrations from empty, idempotent writes, NaN/Inf, series, decisions."""

from __future__ import annotations

import math
import sqlite3
import threading

import numpy as np
import pytest
from sqlalchemy import inspect

from moxco.collector import Point, StoreError, open_store
from moxco.decision import Decision


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'runs.db'}") as s:
        yield s


def test_migrations_create_the_schema_from_empty(tmp_path):
    path = tmp_path / "fresh.db"
    store = open_store(str(path))  # a bare path means a SQLite file
    tables = set(inspect(store.engine).get_table_names())
    assert {"runs", "metric_points", "decisions", "alembic_version"} <= tables
    store.close()
    # opening again is a no-op upgrade, and the file is in WAL mode
    open_store(str(path)).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("select version_num from alembic_version").fetchall() == [("0009",)]  # the head
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_points_round_trip_with_nan_and_inf_and_duplicates_stored_once(store):
    store.put_run("gpt2-adamw", config={"lr": 3e-4})
    values = [0.5, math.nan, math.inf, -math.inf, 1e-300]
    assert store.ingest("gpt2-adamw", [Point(i, "loss", v, 1000.0 + i) for i, v in enumerate(values)]).stored == 5
    # a retried batch (same points) and an overlapping one
    assert store.ingest("gpt2-adamw", [Point(i, "loss", v, 2000.0) for i, v in enumerate(values)]).stored == 0
    assert store.ingest("gpt2-adamw", [(5, "loss", 7.0, 3000.0)]).stored == 1
    steps, got = store.series("gpt2-adamw", "loss")
    assert steps.tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(got, np.array(values + [7.0]))
    assert store.run("gpt2-adamw").last_step == 5


def test_series_range_ranks_latest_and_metric_names(store):
    store.put_run("r")
    store.ingest("r", [Point(s, "inst_gap", -s / 10, 0.0) for s in range(100)])
    store.ingest("r", [Point(s, "sharpness", 2.0 * s, 0.0) for s in range(0, 100, 10)])
    store.ingest("r", [Point(7, "grad_norm_sq", 3.0, 0.0, rank=1)])
    steps, values = store.series("r", "inst_gap", start=10, end=19)
    assert steps.tolist() == list(range(10, 20))
    np.testing.assert_allclose(values, -steps / 10)
    assert store.series("r", "grad_norm_sq", rank=1)[1].tolist() == [3.0]
    assert store.series("r", "grad_norm_sq")[0].size == 0
    assert store.latest("r") == {"inst_gap": (99, pytest.approx(-9.9)), "sharpness": (90, 180.0)}
    assert store.metrics("r") == ["grad_norm_sq", "inst_gap", "sharpness"]


def test_runs_status_and_config_merge(store):
    store.put_run("a", config={"lr": 1})
    store.put_run("b")
    store.set_status("a", "finished")
    assert [r.name for r in store.list_runs()[1]] == ["b", "a"]
    assert [r.name for r in store.list_runs(status="finished")[1]] == ["a"]
    resumed = store.put_run("a", config={"resumed_at": 10}, status="running")
    assert resumed.status == "running" and resumed.config == {"lr": 1, "resumed_at": 10}
    assert store.put_run("a", config={"x": 2}).status == "running"  # no status given: unchanged
    with pytest.raises(StoreError, match="no run named"):
        store.put_run("c", create=False)


@pytest.mark.parametrize("name", ["", "x" * 201, None, "new\nline", "a/b"])
def test_bad_run_names_are_refused_with_a_message(store, name):
    with pytest.raises(StoreError, match="run name"):
        store.put_run(name)


def test_hostile_names_are_just_data(store):
    name = "'; DROP TABLE runs; -- ..\\..\\etc\\passwd ☃"
    store.put_run(name)
    store.ingest(name, [Point(0, "loss", 1.0, 0.0)])
    assert store.series(name, "loss")[1].tolist() == [1.0]
    assert [r.name for r in store.list_runs()[1]] == [name]


def test_unknown_run_status_and_metric_errors(store):
    with pytest.raises(StoreError, match="no run named 'ghost'"):
        store.ingest("ghost", [Point(0, "loss", 1.0, 0.0)])
    store.put_run("r")
    with pytest.raises(StoreError, match="status"):
        store.set_status("r", "exploded")
    with pytest.raises(StoreError, match="metric name"):
        store.ingest("r", [Point(0, "", 1.0, 0.0)])
    with pytest.raises(StoreError, match="metric name"):
        store.ingest("r", [Point(0, "loss\n", 1.0, 0.0)])  # whole-string rule: no trailing newline


def test_decisions_are_idempotent_and_first_acknowledgement_wins(store):
    store.put_run("r")
    decision = Decision(step=120, action={"phase": 2, "alpha": 0.1, "beta": 0.1}, goodness=0.91,
                        grad_term=0.01, sharpness_term=0.05, loss_term=math.nan)
    stored, created = store.add_decision("r", decision)
    assert created and store.add_decision("r", decision) == (stored, False)  # at-least-once delivery: stored once
    ident = stored.id
    assert store.acknowledge("r", ident, 121).applied_step == 121
    assert store.acknowledge("r", ident, 130).applied_step == 121
    (row,) = store.decisions("r")
    assert row.id == ident == "r:policy:120" and row.step == 120 and row.applied_step == 121
    assert row.action == {"phase": 2, "alpha": 0.1, "beta": 0.1} and row.run == "r" and row.status == "applied"
    assert row.goodness == 0.91 and math.isnan(row.loss_term)
    with pytest.raises(StoreError, match="no decision"):
        store.acknowledge("r", "nope", 1)


def test_an_operator_decision_is_one_per_step_and_action_and_a_rejection_is_kept(store):
    from moxco.collector.store import ConflictError

    store.put_run("r")
    operator = Decision(step=5, action={"alpha": 0.2}, source="operator", issued_by="alice", reason="manual")
    stored, created = store.add_decision("r", operator)
    assert created and stored.id == "r:operator:5" and stored.issued_by == "alice" and stored.reason == "manual"
    assert store.add_decision("r", Decision(step=5, action={"phase": 2, "alpha": 0.2}, source="operator"))[1] is False
    with pytest.raises(ConflictError, match="already has"):
        store.add_decision("r", Decision(step=5, action={"phase": 1}, source="operator"))
    assert [d.id for d in store.decisions("r", pending_only=True)] == ["r:operator:5"]
    refused = store.acknowledge("r", "r:operator:5", 9, rejected="no optimizer.commit")
    assert refused.status == "rejected" and refused.rejected == "no optimizer.commit" and refused.applied_step == 9
    assert store.decisions("r", pending_only=True) == []
    assert store.decisions("r") == [refused]


def test_ingest_runs_the_registered_policy_and_acks_ride_along(store):
    """The run's policy decides on a batch's goodness points (state kept with the run), the
    decision records its cause, comes back as pending until acknowledged in a later batch, and an
    unknown acknowledgement is reported without failing the batch."""
    store.put_run("r", policy={"threshold": 0.8, "consecutive": 2})
    probe = lambda step, score: [Point(step, "goodness", score, 1.0), Point(step, "goodness_grad_term", 0.1, 1.0)]
    assert store.ingest("r", probe(10, 0.9)).new == []
    got = store.ingest("r", probe(20, 0.95), batch_id="b2")
    (decision,) = got.new
    assert got.pending == got.new and decision.id == "r:policy:20" and decision.goodness == 0.95
    assert decision.grad_term == 0.1 and decision.policy["threshold"] == 0.8 and decision.issued_by == "policy"
    assert store.ingest("r", probe(20, 0.95), batch_id="b2").duplicate  # a retried batch decides nothing again
    acked = store.ingest("r", [Point(21, "loss", 1.0, 1.0)], acks=[("r:policy:20", 21), ("r:policy:1", 2)])
    assert acked.pending == [] and acked.unknown_acks == ["r:policy:1"]
    assert store.decisions("r")[0].applied_step == 21 and len(store.decisions("r")) == 1


def test_concurrent_writers_and_a_reader_lose_nothing(store):
    store.put_run("r")

    def writer(metric):
        for chunk in range(20):
            store.ingest("r", [Point(chunk * 50 + i, metric, float(i), 0.0) for i in range(50)])

    threads = [threading.Thread(target=writer, args=(m,)) for m in ("loss", "inst_gap", "inst_smooth")]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        store.latest("r")  # reads while writes are in flight (WAL)
    for t in threads:
        t.join()
    for metric in ("loss", "inst_gap", "inst_smooth"):
        assert store.series("r", metric)[0].tolist() == list(range(1000))


def test_large_batch_is_chunked(store):
    store.put_run("r")
    n = 23_456
    store.ingest("r", (Point(i, "loss", float(i), 0.0) for i in range(n)))
    steps, values = store.series("r", "loss")
    assert steps.size == n and values[-1] == n - 1


def test_migration_0004_clusters_sqlite_points_and_keeps_them(tmp_path):
    """Points written at revision 0003 survive the move to a WITHOUT ROWID table; downgrading
    restores the rowid table with its foreign key."""
    from sqlalchemy import create_engine

    from moxco.collector.store import Store, upgrade

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    upgrade(engine, "0003")
    engine.dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO runs (name, status, config, created_at, updated_at) VALUES ('r', 'running', '{}', 1, 1)")
        conn.executemany("INSERT INTO metric_points VALUES (1, 'loss', -1, ?, ?, 1.0)",
                         [(s, None if s == 3 else s / 10) for s in range(10)])
    with Store(str(path)) as store:  # upgrades to the head
        steps, values = store.series("r", "loss")
        assert steps.tolist() == list(range(10))
        assert math.isnan(values[3]) and values[9] == 0.9
    with sqlite3.connect(path) as conn:
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'metric_points'").fetchone()[0]
        assert "WITHOUT ROWID" in ddl and "REFERENCES" not in ddl
    engine = create_engine(f"sqlite:///{path}")
    from alembic import command
    from alembic.config import Config

    from moxco.collector.store import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    engine.dispose()
    with sqlite3.connect(path) as conn:
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'metric_points'").fetchone()[0]
        assert "WITHOUT ROWID" not in ddl and "REFERENCES runs" in ddl
        assert conn.execute("SELECT count(*) FROM metric_points").fetchone()[0] == 10


def test_background_checkpointer_moves_the_wal_into_the_database(tmp_path):
    """With ``background_checkpoint`` the store's connections never checkpoint (auto-checkpoint
    off) and the checkpointer thread copies the WAL into the database file: the file grows while
    no connection of the store has closed."""
    from tests.servers import wait_until

    from moxco.collector.store import Store

    path = tmp_path / "bg.db"
    with Store(str(path), background_checkpoint=True) as store:
        store.put_run("r")
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        size = path.stat().st_size
        for b in range(20):
            n = 1000
            store.ingest("r", (["loss"] * n, list(range(b * n, (b + 1) * n)), [0.5] * n, [1.0] * n, [-1] * n),
                         batch_id=f"b{b}")
        wait_until(lambda: path.stat().st_size > size + 200_000, timeout=60, what="the checkpointer to copy the WAL")
        assert store.series_columns("r", "loss")[0].size == 20_000


def test_migration_0006_keeps_decisions_and_retires_invalid_ones_still_pending(tmp_path):
    """Decisions stored at revision 0005 read back as ``Decision``s with their cause filled in
    (``issued_by`` = ``source``); one whose action the decision type refuses and that no agent
    acknowledged is marked rejected, so it is never handed to an agent; an applied one keeps its
    acknowledgement and its action as stored."""
    import json

    from sqlalchemy import create_engine

    from moxco.collector.store import Store, upgrade

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    upgrade(engine, "0005")
    engine.dispose()
    row = "INSERT INTO decisions (id, run_id, step, source, action, created_at, applied_step) VALUES (?, 1, ?, ?, ?, 1, ?)"
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO runs (name, status, config, created_at, updated_at) VALUES ('r', 'running', '{}', 1, 1)")
        conn.execute(row, ("r:operator:1", 1, "operator", json.dumps({"phase": 2, "alpha": 0.2}), None))
        conn.execute(row, ("r:operator:2", 2, "operator", json.dumps({"phase": 2, "alpha": 5}), None))
        conn.execute(row, ("r:policy:3", 3, "policy", json.dumps({"phase": 2, "lr": -1}), 4))
    with Store(str(path)) as store:
        first, invalid, applied = store.decisions("r")
        assert first.status == "pending" and first.issued_by == "operator" and first.action == {"phase": 2, "alpha": 0.2}
        assert invalid.status == "rejected" and "alpha" in invalid.rejected and invalid.applied_step == 2
        assert applied.status == "applied" and applied.applied_step == 4 and applied.action == {"phase": 2, "lr": -1}
        assert store.decisions("r", pending_only=True) == [first]


def test_the_run_lists_name_glob_runs_in_sql_and_matches_exactly_what_fnmatch_matches(store_url):
    """``list_runs(name=glob)`` filters in the database (SQLite ``GLOB``, PostgreSQL ``~``) with the
    pattern's metacharacters escaped: on names and patterns made of the characters that mean
    something to GLOB, LIKE, regular expressions or fnmatch, it finds exactly ``fnmatchcase``'s runs."""
    import fnmatch
    import random

    rnd = random.Random(7)
    alphabet = "ab]^-![*?\\.%_zé"
    names = sorted({"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 4))) for _ in range(250)}
                   - {".", ".."})
    patterns = ["[a-]", "[]-a]", "[^-z]", "[!^]", "[^]", "[-^]", "[]]", "[!]]", "[a-c-e]", "[z-a]", "[!z-a]", "*%*",
                "_", "\\*", "[\\]", "[[]", "[", "a[", "[!", "[]", "[!]", "*", "?", "a*"]
    patterns += ["".join(rnd.choice(alphabet + "[]*?") for _ in range(rnd.randint(1, 6))) for _ in range(150)]
    with open_store(store_url) as store:
        for name in names:
            store.put_run(name)
        for pattern in patterns:
            want = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
            total, page = store.list_runs(name=pattern, limit=None)
            assert {r.name for r in page} == want and total == len(want), pattern
