"""Fixtures that several test folders share: a private PostgreSQL cluster (tests/servers.py)
with one fresh database per test; ``moxco serve`` subprocesses stopped after each test; and
``kernels``, which runs a test on both the fused and the eager CPU reductions."""

from __future__ import annotations

import pytest

from tests.servers import CollectorProcess, PostgresCluster


@pytest.fixture(scope="session")
def postgres_cluster():
    """The session's private PostgreSQL cluster, stopped at the end."""
    cluster = PostgresCluster()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def postgres_server(postgres_cluster):
    """``postgresql+psycopg://…@127.0.0.1:PORT`` of the session's cluster."""
    return postgres_cluster.server


@pytest.fixture
def pg_url(postgres_cluster):
    """A fresh, empty database on the session's PostgreSQL server."""
    return f"{postgres_cluster.server}/{postgres_cluster.new_database()}"


@pytest.fixture
def serve():
    """``serve(url, *args, env=None)`` starts a ``moxco serve`` subprocess (a started
    ``CollectorProcess``); all are stopped after the test."""
    servers = []

    def start(url: str, *extra: str, env=None) -> CollectorProcess:
        server = CollectorProcess(url, *extra, env=env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["fused", "eager"])
def kernels(request):
    """Runs the test on both of ``moxco.tensors``' CPU paths: the fused kernels (``moxco.native``),
    which must build on this machine, and the eager multi-tensor one they fall back to."""
    from moxco import native

    if request.param == "fused":
        assert native.warm(), native.status()
        yield request.param
    else:
        with native.disabled():
            yield request.param
