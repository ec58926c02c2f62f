"""Real servers for the collector tests: a private PostgreSQL cluster, collector subprocesses.

PostgreSQL comes from the Debian package ``postgresql`` (``scripts/setup.sh dev`` installs it):
``initdb`` a cluster in a temporary folder, ``pg_ctl start`` it on a free loopback port, one fresh
database per test. When the binaries are missing the tests FAIL with what to install: CI
installs them, and a silently skipped PostgreSQL test would hide exactly the multi-worker bugs
they exist for.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: the collector tests need a real server. Install it with "
                    "`apt-get install -y postgresql` (or `bash scripts/setup.sh dev`).", pytrace=False)
    return Path(found[-1]).parent


@pytest.fixture(scope="session")
def postgres_server():
    """``postgresql+psycopg://…@127.0.0.1:PORT/`` of a private cluster, stopped at the end."""
    bindir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="moxco-pg-"))
    data = root / "data"
    port = free_port()
    run_as: list = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "moxco",
                             "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
               "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                             "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://moxco@127.0.0.1:{port}"
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("pg_url")


class Server:
    """A ``moxco serve`` subprocess on a free port."""

    def __init__(self, url: str, *extra: str, env=None) -> None:
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="moxco-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moxco.cli", "serve", "--url", url, "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moxco serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moxco serve did not answer within 60 s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve():
    """``serve(url, *args)`` starts a collector subprocess; all are stopped after the test."""
    servers = []

    def start(url: str, *extra: str, env=None) -> Server:
        server = Server(url, *extra, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
