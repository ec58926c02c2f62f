"""What the fault tests need: a private PostgreSQL cluster they may stop, restart and make
read-only; ``moxco serve`` subprocesses on any store; a tiny hostile HTTP server standing between
the agent and the collector (the network the agent lives in, not a mock of the collector: in its
``proxy`` mode every request reaches the real collector); the figures summary."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import List, Optional

import pytest

from tests.agent.test_transport import Collector as _SqliteCollector
from tests.agent.test_transport import free_port, wait_until
from tests.collector.conftest import _pg_bin
from tests.figures import summary


def pytest_terminal_summary(terminalreporter):
    summary(terminalreporter)


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
    monkeypatch.delenv("MOXCO_TOKEN", raising=False)


class Collector(_SqliteCollector):
    """``moxco serve`` on ``db`` (any store URL) with extra ``serve`` arguments; kill/start like
    the transport tests' collector (same port on restart)."""

    def __init__(self, directory: Path, db: Optional[str] = None, *extra: str, auth: bool = False) -> None:
        super().__init__(directory, auth=auth)
        if db is not None:
            self.db = db
        self.extra = list(extra)

    def start(self) -> "Collector":
        command = [sys.executable, "-m", "moxco.cli", "serve", "--url", self.db, "--host", "127.0.0.1",
                   "--port", str(self.port), *self.extra] + ([] if self.auth else ["--no-auth"])
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.healthy, 90, "the collector to start")
        return self


class PgCluster:
    """A private PostgreSQL cluster (Debian ``postgresql`` binaries) that a test may stop, start,
    restart, and whose databases it may make read-only."""

    def __init__(self) -> None:
        self.bindir = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="moxco-pg-faults-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.run_as: List[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "moxco", "--no-sync", "-E", "UTF8")
        self.start()

    @property
    def server(self) -> str:
        return f"postgresql+psycopg://moxco@127.0.0.1:{self.port}"

    def _pg(self, binary: str, *args: str) -> None:
        subprocess.run(self.run_as + [str(self.bindir / binary), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def admin(self, sql: str) -> list:
        import psycopg

        with psycopg.connect(self.server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def new_database(self) -> str:
        name = "f_" + uuid.uuid4().hex[:12]
        self.admin(f"CREATE DATABASE {name}")
        return name

    def drop_connections(self, database: str) -> int:
        """Terminate every session on ``database``: a collector's pooled connections die."""
        return len(self.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' "
                              "AND pid <> pg_backend_pid()"))

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_cluster():
    cluster = PgCluster()
    yield cluster
    cluster.close()


# --- a hostile server between the agent and the collector ---------------------------------------------


class HostileServer:
    """An HTTP/1.1 server on loopback whose ``mode`` decides what each request gets:

    * ``proxy``: forwarded to ``upstream`` (the real collector) and its answer returned;
    * ``slow``: held ``delay`` seconds, then forwarded (it lands late, after the agent gave up);
    * ``garbage``: ``200 OK`` with an HTML page; ``garbage_json``: ``200`` with a JSON array;
    * ``truncated``: a ``200`` that promises more body than it sends, then closes;
    * ``close``: the connection is closed without an answer; ``reset``: reset (RST).

    ``requests[mode]`` counts what each mode served. ``join()`` waits for held requests."""

    def __init__(self, upstream_port: int, mode: str = "proxy", delay: float = 10.0) -> None:
        self.upstream_port, self.mode, self.delay = upstream_port, mode, delay
        self.requests: dict = {}
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    @staticmethod
    def _read_message(conn: socket.socket, buffer: bytes) -> tuple:
        """One HTTP message (head + Content-Length body) from ``conn``: ``(message, rest)``."""
        while b"\r\n\r\n" not in buffer:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            rest += chunk
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    def _forward(self, message: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60) as up:
            up.sendall(message)
            answer, _ = self._read_message(up, b"")
        return answer or b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                message, buffer = self._read_message(conn, buffer)
                if message is None:
                    return
                mode = self.mode
                with self._lock:
                    self.requests[mode] = self.requests.get(mode, 0) + 1
                if mode == "slow":
                    time.sleep(self.delay)
                    try:
                        conn.sendall(self._forward(message))
                    except OSError:
                        return  # the agent gave up long ago; the request still reached the collector
                elif mode == "proxy":
                    conn.sendall(self._forward(message))
                elif mode in ("garbage", "garbage_json"):
                    body = (b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>" if mode == "garbage"
                            else b"[1, 2, 3]")
                    kind = b"text/html" if mode == "garbage" else b"application/json"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                elif mode == "truncated":
                    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"ba')
                    return
                elif mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                else:  # close
                    return
        except OSError:
            return
        finally:
            conn.close()

    def join(self, timeout: float = 60.0) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()


@pytest.fixture
def hostile():
    servers = []

    def make(upstream_port: int, mode: str = "proxy", delay: float = 10.0) -> HostileServer:
        server = HostileServer(upstream_port, mode, delay)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
