"""The collector tests run on SQLite and on a real PostgreSQL server: ``postgres_server``,
``pg_url`` and ``serve`` come from tests/conftest.py (helpers in tests/servers.py)."""

from __future__ import annotations

import pytest

from tests.servers import free_port  # noqa: F401  (tests/collector/test_api.py imports it from here)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("pg_url")
