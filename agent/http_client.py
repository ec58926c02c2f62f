"""The HTTP client of the agent's transport (``agent.transport.HttpSink``): one keep-alive connection
to the collector, a timeout on every request, the server's error message and ``Retry-After``.

The client is ``http.client`` from the standard library rather than httpx: the sender needs one
keep-alive connection, timeouts and nothing else, and the agent's base install (torch, numpy,
SQLAlchemy) stays free of httpx's dependency tree (httpcore, h11, anyio, sniffio, certifi, idna).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

API = "/api/v1"  # the collector's API prefix (docs/api.md)


class Unreachable(Exception):
    """The collector did not answer (connection refused/reset, timeout, TLS failure)."""


@dataclass
class Response:
    status: int
    body: Any
    retry_after: Optional[float] = None

    @property
    def message(self) -> str:
        """The server's error message (docs/api.md error shape), else the body as text."""
        if isinstance(self.body, Mapping) and isinstance(self.body.get("error"), Mapping):
            return str(self.body["error"].get("message") or self.body["error"])
        return str(self.body)[:500]


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Client:
    """One keep-alive HTTP(S) connection to the collector with a timeout on every request.

    Not thread-safe; the sender thread owns one, and synchronous reads (``decisions``) use their own.
    """

    def __init__(self, url: str, token: Optional[str], timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) collector URL: {url!r}")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.timeout = float(timeout)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "User-Agent": "moxco-agent"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._conn: Optional[http.client.HTTPConnection] = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, body: Any = None) -> Response:
        """Send one request; raises ``Unreachable`` when no HTTP response came back."""
        data = None if body is None else json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self.base + path, body=data, headers=self.headers)
                raw = conn.getresponse()
                payload = raw.read()
                retry_after = _retry_after(raw.getheader("Retry-After"))
                if raw.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if attempt == 0:
                    continue  # a kept-alive connection the server closed meanwhile: reconnect once
                raise Unreachable(f"{type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:  # refused, timeout, TLS, bad status line
                self.close()
                raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode("utf-8", "replace")
        return Response(raw.status, parsed, retry_after)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

