"""Real servers for the tests, in one place: free loopback ports, polling, ``moxco serve`` in a
subprocess, and a private PostgreSQL cluster.

PostgreSQL comes from the Debian package ``postgresql`` (``scripts/setup.sh dev`` installs it):
``initdb`` a cluster in a temporary folder, ``pg_ctl start`` it on a free loopback port. When a
server binary is missing the tests FAIL with what to install, never skip: CI installs them, and a
silently skipped test would hide exactly the bugs they exist for.

Nothing here imports pytest at module level, so scripts outside the test suite (bench/) may use it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate``; the timeout only turns a hang into a failure (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def missing(message: str):
    """Fail (never skip) because something the test needs is not installed: ``pytest.fail`` without
    a traceback under pytest, ``RuntimeError`` elsewhere (bench/)."""
    pytest = sys.modules.get("pytest")
    if pytest is None:
        raise RuntimeError(message)
    pytest.fail(message, pytrace=False)


# --- moxco serve ---------------------------------------------------------------------------------


class CollectorProcess:
    """``moxco serve --store DB`` in a subprocess on a free loopback port (the CLI's default host),
    stdout and stderr appended to ``log``.

    ``start()`` waits for ``/healthz`` (an exit or no answer within ``timeout`` raises with the log);
    ``stop()`` terminates, then kills; ``kill()`` is SIGKILL to the server and its workers; ``start()`` again serves the same store
    on the same port. ``auth=False`` adds ``--no-auth``; ``extra`` goes to ``serve``; ``env`` is added
    to the environment; ``program`` replaces ``python -m moxco.cli`` (the console script, say)."""

    def __init__(self, db: str, *extra: str, auth: bool = True, log: Optional[Path] = None, env: Optional[dict] = None,
                 program: Optional[Sequence[str]] = None, timeout: float = 90.0) -> None:
        self.db = db
        self.extra = list(extra)
        self.auth = auth
        self.env = dict(env or {})
        self.program = list(program or [sys.executable, "-m", "moxco.cli"])
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log is None:
            fd, name = tempfile.mkstemp(prefix="moxco-serve-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = Path(log)
        self.process: Optional[subprocess.Popen] = None

    @classmethod
    def in_directory(cls, directory: Path, db: Optional[str] = None, *extra: str, auth: bool = False,
                     **kwargs) -> "CollectorProcess":
        """The agent tests' collector: ``db`` or a SQLite store ``collector.db`` in ``directory``,
        the log ``collector.log`` next to it, no auth unless asked. Not started yet."""
        return cls(db or f"sqlite:///{directory / 'collector.db'}", *extra, auth=auth,
                   log=directory / "collector.log", **kwargs)

    @property
    def command(self) -> List[str]:
        return [*self.program, "serve", "--store", self.db, "--port", str(self.port), *self.extra] + (
            [] if self.auth else ["--no-auth"])

    def start(self) -> "CollectorProcess":
        if shutil.which(self.program[0]) is None:
            missing(f"{self.program[0]} does not exist: install moxco into this environment (`pip install -e .`, "
                    "or `bash scripts/setup.sh dev`).")
        with open(self.log, "ab") as log:
            # its own process group: kill() takes uvicorn's worker processes down with it, as a crash would
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                                            start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moxco serve did not answer on {self.url}/healthz within {self.timeout:.0f} s:"
                                   f"\n{self.output()[-5000:]}")
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"moxco serve exited with {self.process.returncode}:\n{self.output()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        """Everything the server wrote so far (all its starts)."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server and every worker process it started (its whole process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def store(self):
        """The served store, opened directly."""
        from moxco.collector import open_store

        return open_store(self.db)


def serving(db: str, store, *extra: str):
    """A module fixture's body: a collector serving ``db`` without auth while the test holds ``store``
    open; yields ``(collector, store)``, then stops the one and closes the other
    (``yield from serving(url, store)``)."""
    collector = CollectorProcess(db, "--no-auth", *extra).start()
    try:
        yield collector, store
    finally:
        collector.stop()
        store.close()


# --- PostgreSQL ----------------------------------------------------------------------------------


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        missing("PostgreSQL is not installed: these tests need a real server. Install it with "
                "`apt-get install -y postgresql` (or `bash scripts/setup.sh dev`).")
    return Path(found[-1]).parent


class PostgresCluster:
    """A private PostgreSQL cluster (Debian ``postgresql`` binaries) on a free loopback port, started
    on creation; a test may stop, start and restart it, create databases and drop their sessions.
    ``close()`` stops it (immediately) and removes its folder."""

    def __init__(self, max_connections: int = 200, prefix: str = "moxco-pg-") -> None:
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.port = free_port()
        self.max_connections = max_connections
        self.run_as: List[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "moxco", "--no-sync", "-E", "UTF8")
        self.start()

    @property
    def server(self) -> str:
        """``postgresql+psycopg://moxco@127.0.0.1:PORT``: append ``/DATABASE``."""
        return f"postgresql+psycopg://moxco@127.0.0.1:{self.port}"

    def _pg(self, binary: str, *args: str) -> None:
        try:
            subprocess.run(self.run_as + [str(self.bindir / binary), *args], check=True, capture_output=True,
                           timeout=120)
        except subprocess.CalledProcessError as exc:
            log = self.root / "log"
            raise RuntimeError(f"{binary} {' '.join(args)} failed ({exc.returncode}):\n"
                               f"{exc.stdout.decode(errors='replace')}{exc.stderr.decode(errors='replace')}"
                               + (log.read_text(errors="replace")[-3000:] if log.exists() else "")) from exc

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections={self.max_connections}")
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def admin(self, sql: str) -> list:
        """Run ``sql`` on the ``postgres`` database (autocommit); the rows it returns."""
        import psycopg

        with psycopg.connect(self.server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def new_database(self, prefix: str = "t_") -> str:
        """The name of a fresh, empty database."""
        name = prefix + uuid.uuid4().hex[:12]
        self.admin(f"CREATE DATABASE {name}")
        return name

    def drop_connections(self, database: str) -> int:
        """Terminate every session on ``database``: a collector's pooled connections die."""
        return len(self.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' "
                              "AND pid <> pg_backend_pid()"))

    def close(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


# --- Prometheus ----------------------------------------------------------------------------------


class PrometheusServer:
    """A real Prometheus (Debian package ``prometheus``) scraping ``targets`` (``host:port``) every
    second, on a free loopback port, with its data in a temporary folder; ``query(expr)`` asks its
    HTTP API; ``close()`` stops it and removes the folder."""

    def __init__(self, targets: Sequence[str], *, job: str = "moxco-collector") -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            missing("prometheus is not installed: `apt-get install -y prometheus` (or `bash scripts/setup.sh dev`).")
        self.root = Path(tempfile.mkdtemp(prefix="moxco-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.root / "prometheus.yml"
        config.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
                                      "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}]}))
        self.log = self.root / "log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
                                             f"--web.listen-address=127.0.0.1:{self.port}"],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ready, 60, f"Prometheus on {self.url}")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=10) as response:
            return json.loads(response.read())["data"]

    def query(self, expr: str) -> list:
        from urllib.parse import quote

        return self.api(f"query?query={quote(expr)}")["result"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)
