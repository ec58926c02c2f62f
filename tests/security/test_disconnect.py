"""A trainer killed mid-upload: the collector sees the client go away in the middle of a batch's
body. That is the client's doing, counted as ``errors_total{kind="client_disconnected"}``, never
as a server error (no traceback in the log, no ``kind="server"``), and not as a rejected batch;
the shipped alert on server errors does not fire on it (its promtool unit test has such a series)."""

from __future__ import annotations

import socket
import time

import httpx

from tests.figures import figure
from tests.servers import wait_until


def counter(text: str, name: str, label: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{label}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_hangs_up_mid_body_is_its_own_error_kind(tmp_path, serve):
    server = serve(f"sqlite:///{tmp_path / 'runs.db'}", "--no-auth")
    httpx.put(f"{server.url}/api/v1/runs/r", json={})
    aborted = 20
    for i in range(aborted):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /api/v1/runs/r/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000\r\n\r\n" + b'{"batch_id": "b", "points": [' + b'["loss", 1, 1.0, 1.0],' * 50)
            time.sleep(0.02)
    errors = "moxco_collector_errors_total"
    wait_until(lambda: counter(httpx.get(f"{server.url}/metrics").text, errors, 'kind="client_disconnected"') >= aborted,
               30, "the disconnects counted")
    text = httpx.get(f"{server.url}/metrics").text
    figure("20 batch uploads cut off mid-body (a trainer killed during an upload)", aborted=aborted,
           client_disconnected=counter(text, errors, 'kind="client_disconnected"'),
           server_errors=counter(text, errors, 'kind="server"'),
           rejected_batches=counter(text, "moxco_collector_ingest_batches_total", 'outcome="rejected"'))
    assert counter(text, errors, 'kind="server"') == 0
    assert counter(text, "moxco_collector_ingest_batches_total", 'outcome="rejected"') == 0
    assert "internal error" not in server.output() and "ClientDisconnect" not in server.output()
    assert httpx.post(f"{server.url}/api/v1/runs/r/batches",
                      json={"batch_id": "after", "points": [["loss", 1, 1.0, 1.0]]}).json()["stored"] == 1
