"""What the fault tests need: a private PostgreSQL cluster they may stop, restart and make
read-only; a tiny hostile HTTP server standing between the agent and the collector (the network the
agent lives in, not a mock of the collector: in its ``proxy`` mode every request reaches the real
collector); the figures summary. ``moxco serve`` on any store is tests/servers.py's
``CollectorProcess``."""

from __future__ import annotations

import socket
import threading
import time
from typing import List

import pytest

from tests.figures import summary
from tests.servers import PostgresCluster


def pytest_terminal_summary(terminalreporter):
    summary(terminalreporter)


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
    monkeypatch.delenv("MOXCO_TOKEN", raising=False)


@pytest.fixture(scope="module")
def pg_cluster():
    """A private PostgreSQL cluster of this module's own: the fault tests stop, restart it and make
    its databases read-only."""
    cluster = PostgresCluster(max_connections=100, prefix="moxco-pg-faults-")
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
