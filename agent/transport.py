"""The agent's HTTP transport: ``attach(url="http://host:port")`` ships points to a collector.

``HttpSink`` offers the calls the agent and its writer make on where points go (``put_run``,
``ingest``, ``set_status``, ``decisions``, ``close``: the ``Sink`` protocol, the store's own calls),
as the embedded sink (``agent.sink.EmbeddedSink``, a ``Store`` in this process) does, so ``core``
and ``writer`` do not know which one they hold. It speaks the collector's HTTP API (docs/api.md)
and is built around one rule: the training job never waits on the network and never sees a
network error.

* **Nothing blocks the caller.** Every write only appends to memory under a short lock; a
  background sender thread owns the connection and does every request (each with a timeout).
* **Batching.** Points are cut into batches of up to ``batch_points`` (default 5000) or after
  ``linger`` seconds (0.5). A batch never splits one ``ingest`` call, so a goodness point and
  its three term points (one probe) reach the collector's policy together. Each envelope has an id
  ``<session uuid>-<sequence>``; a batch's id is its ``batch_id``, so a batch sent twice (a
  timeout whose request did land, a spool replayed after a crash) is stored once.
* **Spool.** When the collector is unreachable (connection errors, timeouts, 5xx, 429, 401/403)
  everything queued moves, in order, to append-only segment files under the spool directory
  (``$MOXCO_SPOOL/<run>``, default ``~/.cache/moxco/spool/<run>``), capped at ``spool_max_bytes``.
  The sender replays the spool, oldest first, before anything newer, retrying with exponential
  backoff with jitter (a 503/429 ``Retry-After`` is honoured). When the spool is full, further
  points are dropped *and counted*, with one warning; the count is logged at ``close`` and sent
  with the run (``config.transport``). ``close()`` flushes for at most ``timeout`` seconds and
  leaves what did not go on disk; a later agent with the same run name replays it first.
* **Garbage is not success.** A 2xx whose body is not the collector's JSON (an HTML page from a
  proxy, a body for another batch) is retried like a 503: the data stays spooled.
* **Bad input is not retried forever.** A 4xx other than 401/403/404/429 (400, 409, 413, 422)
  means the collector will never take that envelope: it is logged with the server's message,
  its points counted as rejected, and the sender moves on. A 404 on a batch (the collector lost
  the run, e.g. a fresh store) re-registers the run and retries once.
* **Decisions.** The decision policy runs in the store, on ingest (``PolicyConfig`` goes with the
  run registration), in the collector here as in embedded mode. Unacknowledged decisions come
  back in every ingest response and, when the sender is idle, from ``GET …/decisions/pending``
  every ``poll_every`` seconds; they are handed to the agent's ``on_decision(ident, Decision)``
  (parsed with ``Decision.from_json``). Acknowledgements (given to ``ingest``) ride in the next
  batch's ``acks`` (or go as ``POST …/ack`` when no batch is due). Delivery is at-least-once:
  ids already acknowledged by this run (persisted in ``<spool dir>/acked``, so across restarts
  too) are never handed over again, and the agent keeps its own set of applied ids. A batch
  holding a goodness point is cut at once (no ``linger``), and once the collector has answered it
  its probes' steps go to ``on_answer(steps)``: the collector's policy has decided on them (an
  agent in the ``decisions="sync"`` mode waits for that at the probe's ``apply_at``). A decision
  the agent cannot parse is acknowledged as rejected, so it does not stay pending.

The client is ``http.client`` from the standard library rather than httpx: the sender needs one
keep-alive connection, timeouts and nothing else, and the agent's base install (torch, numpy,
SQLAlchemy) stays free of httpx's dependency tree (httpcore, h11, anyio, sniffio, certifi, idna).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable
from urllib.parse import quote, urlsplit

from moxco.decision import Decision
from moxco.policy import probe_steps
from moxco.wire import encode_point

log = logging.getLogger("moxco.agent.transport")

API = "/api/v1"
_UNSET: Any = object()  # put_run: "leave as registered"


@runtime_checkable
class Sink(Protocol):
    """What the agent and its writer need from where points go: the embedded store
    (``agent.sink.EmbeddedSink``) or a collector (``HttpSink``). The calls are the store's own
    (``moxco.collector.store.Store``): ``put_run`` registers the run with its config, optimizer and
    decision policy (the store's ingest runs the policy); ``ingest`` takes ``Point``s and
    acknowledgements ``(decision id, applied step[, rejected reason])``; ``decisions`` returns
    ``Decision`` objects. Decisions the store takes come back through the ``on_decision`` callback
    the sink was opened with, each id once."""

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = _UNSET,
                policy: Any = _UNSET, status: Optional[str] = None, create: bool = True) -> Any: ...

    def ingest(self, name: str, points: Iterable[Any], *, acks: Sequence[Tuple] = ()) -> Any: ...

    def set_status(self, name: str, status: str) -> None: ...

    def decisions(self, name: str) -> List[Decision]: ...

    def close(self) -> None: ...


def is_http_url(url: Optional[str]) -> bool:
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


def open_sink(url: str, run: str, *, token: Optional[str] = None,
              on_decision: Optional[Callable[[str, Decision], None]] = None,
              on_answer: Optional[Callable[[List[int]], None]] = None, **options: Any) -> Sink:
    """An ``HttpSink`` for an ``http(s)://`` collector URL, else the embedded sink on the store at
    ``url`` (``agent.sink.EmbeddedSink.open``: one it cannot open is replaced by one in the spool
    folder)."""
    if is_http_url(url):
        return HttpSink(url, run, token=token, on_decision=on_decision, on_answer=on_answer, **options)
    if options:  # e.g. a script with transport options run with MOXCO_URL pointing at a file
        log.warning("moxco: transport options %s apply to an http(s):// collector only; ignored for %s",
                    sorted(options), url)
    from moxco.agent.sink import EmbeddedSink

    return EmbeddedSink.open(url, run, on_decision=on_decision, on_answer=on_answer)  # never raises for store trouble


def default_spool_dir(run: str) -> Path:
    """``$MOXCO_SPOOL/<run>``, else ``~/.cache/moxco/spool/<run>`` (the name percent-encoded; a
    very long name is shortened with a hash so it stays a valid file name)."""
    root = Path(os.environ.get("MOXCO_SPOOL") or Path.home() / ".cache" / "moxco" / "spool").expanduser()
    name = quote(run, safe="")
    if len(name.encode()) > 120 or name in (".", ".."):
        name = f"{name[:80]}-{hashlib.sha256(run.encode()).hexdigest()[:16]}"
    return root / name


# --- the on-disk spool -----------------------------------------------------------------------------


class Spool:
    """Append-only JSON-lines segment files, read back oldest first.

    ``append`` writes whole lines and flushes (a crash loses at most a partial last line, which the
    reader skips); ``peek``/``pop`` walk the oldest segment, which is deleted once read. Segments
    left by an earlier process are read before anything this process appends (new appends always
    open a new segment). ``max_bytes`` caps the bytes on disk; ``append`` returns what did not fit.
    Not thread-safe: ``HttpSink`` calls it under its lock.
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 8 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.segment_bytes = int(max_bytes), int(segment_bytes)
        self.segments: Deque[int] = deque(sorted(int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit()))
        self.bytes = sum(self._path(n).stat().st_size for n in self.segments)
        self.leftover = self.bytes > 0  # data an earlier process could not send
        self.skipped_lines = 0
        self._offset = 0  # read position in segments[0]
        self._peeked: Optional[Tuple[dict, int]] = None  # (envelope, its line length)
        self._tail: Optional[Any] = None  # file appended to (always a segment this process created)
        self._tail_number: Optional[int] = None
        self._tail_size = 0

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:08d}.seg"

    def __bool__(self) -> bool:
        return self.bytes - self._offset > 0

    def append(self, envelopes: Iterable[dict]) -> List[dict]:
        """Append envelopes in order; returns the point-carrying ones refused because the cap is
        reached. Envelopes without points (registration, status, acknowledgement) are tiny and
        carry order and decisions' fate, so they are always written."""
        refused = []
        for envelope in envelopes:
            line = (json.dumps(envelope, separators=(",", ":"), allow_nan=False) + "\n").encode()
            if envelope.get("points") and self.bytes + len(line) > self.max_bytes:
                refused.append(envelope)
                continue
            if self._tail is None or self._tail_size >= self.segment_bytes:
                self._rotate()
            self._tail.write(line)
            self._tail_size += len(line)
            self.bytes += len(line)
        if self._tail is not None:
            self._tail.flush()
        return refused

    def _rotate(self) -> None:
        if self._tail is not None:
            self._tail.close()
        number = (self.segments[-1] + 1) if self.segments else 1
        self._tail = open(self._path(number), "ab")
        self._tail_number, self._tail_size = number, 0
        self.segments.append(number)

    def peek(self) -> Optional[dict]:
        """The oldest envelope not yet popped, or None."""
        while self._peeked is None:
            if not self:
                self._clear()
                return None
            head = self.segments[0]
            with open(self._path(head), "rb") as f:
                f.seek(self._offset)
                line = f.readline()
            if not line:  # this segment is read to its end
                self._drop_head()
                continue
            if not line.endswith(b"\n") and head != self._tail_number:
                self.skipped_lines += 1  # a partial last line left by a crash
                self._offset += len(line)
                continue
            try:
                self._peeked = (json.loads(line), len(line))
            except ValueError:
                self.skipped_lines += 1
                self._offset += len(line)
        return self._peeked[0]

    def pop(self) -> None:
        """Forget the envelope ``peek`` returned (it was delivered)."""
        if self._peeked is None:
            return
        self._offset += self._peeked[1]
        self._peeked = None
        if not self:
            self._clear()

    def _clear(self) -> None:
        """Everything was read: delete the segments rather than keep read data on disk."""
        while self.segments:
            self._drop_head()

    def _drop_head(self) -> None:
        number = self.segments.popleft()
        path = self._path(number)
        size = path.stat().st_size if path.exists() else 0
        if number == self._tail_number:
            self._tail.close()
            self._tail, self._tail_number, self._tail_size = None, None, 0
        path.unlink(missing_ok=True)
        self.bytes -= size
        self._offset = 0

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None


# --- HTTP ------------------------------------------------------------------------------------------


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


# --- the sink --------------------------------------------------------------------------------------


@dataclass
class TransportStats:
    """Counters of an ``HttpSink`` (``HttpSink.stats``); points are never lost without being counted."""

    points_enqueued: int = 0
    points_sent: int = 0  # in batches the collector answered 2xx (duplicates included)
    batches_sent: int = 0
    duplicate_batches: int = 0  # batches the collector had stored already (a retry that landed)
    points_rejected: int = 0  # in batches a 4xx refused for good
    points_dropped: int = 0  # spool full (or unwritable): never sent
    points_spooled: int = 0  # moved to disk while the collector was away (counted once per move)
    requests: int = 0
    failed_requests: int = 0  # no response, 5xx, 429, 401/403
    decisions_received: int = 0  # handed to the agent (first sight of each id)
    spool_leftover: bool = False  # an earlier process left a spool, replayed first
    foreground_requests: int = 0  # requests made outside the sender thread (``decisions()`` only)


_OK, _REJECTED, _RETRY = "ok", "rejected", "retry"


class HttpSink:
    """Ships a run's points, status and acknowledgements to a collector (see the module docstring).

    Options: ``token`` (default ``$MOXCO_TOKEN``), ``spool_dir``, ``spool_max_bytes`` (1 GiB),
    ``batch_points`` (5000), ``linger`` (0.5 s), ``max_memory_points`` (200 000: beyond that,
    queued batches move to the spool), ``timeout`` (10 s per request), ``backoff`` (0.25 s
    first retry) and ``max_backoff`` (10 s), ``poll_every`` (2 s), ``close_timeout`` (10 s).
    """

    def __init__(self, url: str, run: str, *, token: Optional[str] = None,
                 on_decision: Optional[Callable[[str, Decision], None]] = None,
                 on_answer: Optional[Callable[[List[int]], None]] = None,
                 spool_dir: Optional[os.PathLike | str] = None, spool_max_bytes: int = 1 << 30,
                 batch_points: int = 5000, linger: float = 0.5, max_memory_points: int = 200_000,
                 timeout: float = 10.0, backoff: float = 0.25, max_backoff: float = 10.0,
                 poll_every: float = 2.0, close_timeout: float = 10.0) -> None:
        if batch_points < 1 or max_memory_points < batch_points:
            raise ValueError("batch_points must be ≥ 1 and max_memory_points ≥ batch_points")
        self.url, self.run = url.rstrip("/"), run
        self.on_decision = on_decision
        self.on_answer = on_answer
        self.batch_points, self.linger, self.max_memory_points = int(batch_points), float(linger), int(max_memory_points)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.poll_every, self.close_timeout, self.timeout = float(poll_every), float(close_timeout), float(timeout)
        self._token = token if token is not None else os.environ.get("MOXCO_TOKEN")
        self._client = Client(self.url, self._token, timeout)
        self.stats = TransportStats()

        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir(run)
        try:
            self._lock_file = self._lock_spool_dir()
        except OSError as exc:  # e.g. a read-only home: a private temporary spool rather than no job
            fallback = Path(tempfile.mkdtemp(prefix="moxco-spool-")) / self.spool_dir.name
            log.warning("moxco: run %r: cannot use the spool directory %s (%s); using %s (set $MOXCO_SPOOL or "
                        "transport={'spool_dir': ...})", run, self.spool_dir, exc, fallback)
            self.spool_dir = fallback
            self._lock_file = self._lock_spool_dir()
        self.spool = Spool(self.spool_dir, spool_max_bytes)
        self.stats.spool_leftover = self.spool.leftover
        if self.spool.leftover:
            log.warning("moxco: run %r: replaying %d bytes an earlier agent left in the spool %s", run,
                        self.spool.bytes, self.spool_dir)
        self._acked_path = self.spool_dir / "acked"
        self._acked = set(self._acked_path.read_text().split()) if self._acked_path.exists() else set()
        self._seen: set[str] = set()  # decision ids already handed to the agent

        self._session = uuid.uuid4().hex[:16]
        self._seq = 0
        self._cond = threading.Condition()
        self._points: List[list] = []  # encoded, not yet in a batch
        self._probes: List[int] = []  # the steps of the goodness points among them
        self._points_since = 0.0
        self._acks: List[dict] = []
        self._acks_since = 0.0
        self._outbox: Deque[dict] = deque()  # envelopes in memory; all newer than anything spooled
        self._memory_points = 0  # in _points and _outbox
        self._registration: Optional[dict] = None
        self._offline = False
        self._attempt = 0
        self._closing = False
        self._deadline = math.inf
        self._closed = False
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name=f"moxco-sender[{run}]", daemon=True)
        self._thread.start()

    # --- the Sink methods: called by the agent/writer threads; memory only, never the network ----------

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = _UNSET,
                policy: Any = _UNSET, status: Optional[str] = None, create: bool = True) -> None:
        """Register (or update) the run: ``PUT /runs/{run}`` with the registration so far (config
        merged, optimizer and policy as last given; the collector's ingest runs the policy).
        ``create=False``: ``PATCH``, the run must exist."""
        with self._cond:
            body = dict(self._registration or {"config": {}, "status": "running"})
            body["config"] = {**body["config"], **dict(config or {})}
            if optimizer is not _UNSET:
                body["optimizer"] = optimizer
            if policy is not _UNSET:
                body["policy"] = policy.to_dict() if hasattr(policy, "to_dict") else policy
            if status is not None:
                body["status"] = status
            self._registration = body
            # a snapshot: later updates make new envelopes
            self._enqueue("run" if create else "status", json.loads(json.dumps(body)))

    def set_status(self, name: str, status: str) -> None:
        with self._cond:
            if self._registration is not None:
                self._registration["status"] = status
            self._enqueue("status", {"status": status})

    def ingest(self, name: str, points: Iterable[Any], *, acks: Sequence[Tuple] = ()) -> None:
        """Queue points (and acknowledgements ``(decision id, applied step[, rejected reason])``)
        for the next batch. What the collector answers comes later: decisions through
        ``on_decision``, losses in ``stats``."""
        points = points if isinstance(points, (list, tuple)) else list(points)
        encoded = [encode_point(p) for p in points]
        probes = probe_steps(points)
        for ack in acks:
            self._acknowledge(*ack)
        if not encoded:
            return
        with self._cond:
            self.stats.points_enqueued += len(encoded)
            if not self._points:
                self._points_since = time.monotonic()
            self._points.extend(encoded)
            self._probes.extend(probes)
            self._memory_points += len(encoded)
            if len(self._points) >= self.batch_points or probes:  # a probe goes at once: the policy decides on it
                self._cut_batch()
                self._cond.notify_all()
            if self._memory_points > self.max_memory_points:
                self._cut_batch()
                self._spill()  # bounded memory: the collector is slow or away

    def _acknowledge(self, ident: str, applied_step: int, rejected: Optional[str] = None) -> None:
        """Queue an acknowledgement; it rides in the next batch's ``acks`` (or ``POST …/ack``)."""
        ack = {"decision_id": ident, "applied_step": int(applied_step)}
        if rejected is not None:
            ack["rejected"] = str(rejected)
        with self._cond:
            self._acked.add(ident)
            if not self._acks:
                self._acks_since = time.monotonic()
            self._acks.append(ack)
            self._cond.notify_all()

    def decisions(self, name: str) -> List[Decision]:
        """All decisions of the run with their acknowledgements (``GET /runs/{run}/decisions``, a
        ``read``-scope request made now, on the caller's thread; never called by training hooks)."""
        client = Client(self.url, self._token, self.timeout)
        self.stats.foreground_requests += 1
        try:
            response = client.request("GET", f"{API}/runs/{quote(name, safe='')}/decisions")
        finally:
            client.close()
        if response.status != 200:
            raise RuntimeError(f"collector answered {response.status} to GET decisions: {response.message}")
        items = response.body.get("decisions", []) if isinstance(response.body, Mapping) else response.body
        return [Decision.from_json(item) for item in items]

    def close(self, timeout: Optional[float] = None) -> None:
        """Send what is queued for at most ``timeout`` seconds (default ``close_timeout``), then
        leave the rest in the spool and stop. Never raises; what is left and what was lost is logged."""
        if self._closed:
            return
        timeout = self.close_timeout if timeout is None else float(timeout)
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cut_batch()
            self._cut_acks()
            reported = self._report_losses(None)
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
        with self._cond:
            self._closed = True
            self._cut_batch()
            self._cut_acks()
            if self._outbox:  # not delivered in time: keep it for a later run
                self._spill()
            self._report_losses(reported)  # the final spill may have dropped more: straight to the spool
            left = bool(self.spool)
            self.spool.close()
        if not self._thread.is_alive():
            self._client.close()
        if left:
            log.warning("moxco: run %r: the collector at %s did not take everything before close; the rest is "
                        "in the spool %s and an agent attached with the same run name replays it first",
                        self.run, self.url, self.spool_dir)
        s = self.stats
        if s.points_dropped or s.points_rejected:
            log.warning("moxco: run %r: %d points dropped (spool full) and %d rejected by the collector",
                        self.run, s.points_dropped, s.points_rejected)
        if not left:  # all delivered, acknowledgements included: nothing worth keeping on disk
            try:  # (the lock file goes while still locked, so no other agent can be holding it)
                for name in ("acked", "lock"):
                    (self.spool_dir / name).unlink(missing_ok=True)
                self.spool_dir.rmdir()
            except OSError:
                pass  # foreign files: leave the directory alone
        self._unlock_spool_dir()

    def _report_losses(self, reported: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        """Send the counts of dropped and rejected points with the run (``config.transport``), when
        there are any and they changed since ``reported``."""
        counts = (self.stats.points_dropped, self.stats.points_rejected)
        if any(counts) and counts != reported and self._registration is not None:
            self._registration["config"]["transport"] = {"points_dropped": counts[0], "points_rejected": counts[1]}
            self._enqueue("run", json.loads(json.dumps(self._registration)))
        return counts

    @property
    def pending(self) -> int:
        """Envelopes and points not yet delivered (in memory or in the spool): 0 once all went."""
        with self._cond:
            return len(self._points) + len(self._outbox) + len(self._acks) + (1 if self.spool else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is delivered (True) or ``timeout`` passes (False).
        For tests and scripts; the training loop never needs it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cut_batch()
            self._cut_acks()
            self._cond.notify_all()
            while self._points or self._outbox or self._acks or self.spool or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # --- queueing (call with the lock held) -----------------------------------------------------------

    _busy = False  # the sender holds an envelope it has not finished with
    _poll_failures = 0

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._session}-{self._seq:06d}"

    def _envelope(self, kind: str, body: dict, points: int = 0, probes: Sequence[int] = ()) -> dict:
        """One unit of delivery, in memory or a spool line; its id is a batch's ``batch_id``;
        ``probes``: the steps of its goodness points, answered once the collector has taken it."""
        envelope = {"kind": kind, "id": self._next_id(), "body": body, "points": points}
        if probes:
            envelope["probes"] = list(probes)
        if kind == "batch":
            body["batch_id"] = envelope["id"]
        return envelope

    def _enqueue(self, kind: str, body: dict, points: int = 0, probes: Sequence[int] = ()) -> None:
        if kind in ("run", "status"):
            self._cut_batch()  # what was written before a status change goes before it
        envelope = self._envelope(kind, body, points, probes)
        if self._closed:  # after close: straight to disk, for the next run
            self._to_spool([envelope])
        else:
            self._outbox.append(envelope)
        self._cond.notify_all()

    def _cut_batch(self) -> None:
        if not self._points:
            return
        points, self._points = self._points, []
        probes, self._probes = self._probes, []
        acks, self._acks = self._acks, []
        self._persist_acks(acks)
        # the points stay counted in _memory_points while they are in the outbox
        self._enqueue("batch", {"points": points, "acks": acks}, points=len(points), probes=probes)

    def _cut_acks(self) -> None:
        """Acknowledgements with no batch to ride in: one ``POST …/ack`` each."""
        acks, self._acks = self._acks, []
        self._persist_acks(acks)
        for ack in acks:
            self._enqueue("ack", ack)

    def _persist_acks(self, acks: List[dict]) -> None:
        if not acks:
            return
        try:
            with open(self._acked_path, "a") as f:
                f.write("".join(f"{a['decision_id']}\n" for a in acks))
        except OSError as exc:
            self._warn_once("acked", "moxco: cannot record acknowledged decisions in %s: %s", self._acked_path, exc)

    def _spill(self) -> None:
        """Move the in-memory outbox, in order, to the end of the spool."""
        envelopes = list(self._outbox)
        self._outbox.clear()
        self._memory_points = len(self._points)
        self._to_spool(envelopes)

    def _to_spool(self, envelopes: List[dict]) -> None:
        """Append envelopes to the spool; batches that do not fit are dropped and counted (their
        acknowledgements are kept, as ``ack`` envelopes)."""
        try:
            refused = self.spool.append(envelopes)
            acks = [self._envelope("ack", ack) for e in refused for ack in e["body"].get("acks") or []]
            if acks:
                self.spool.append(acks)
        except OSError as exc:
            self._warn_once("spool-io", "moxco: run %r: cannot write the spool %s (%s); points are dropped "
                            "while the collector is away", self.run, self.spool_dir, exc)
            refused = [e for e in envelopes if e["points"]]
        lost = sum(e["points"] for e in refused)
        self.stats.points_spooled += sum(e["points"] for e in envelopes) - lost
        if lost:
            self.stats.points_dropped += lost
            self._warn_once("spool-full", "moxco: run %r: the spool %s is full (spool_max_bytes=%d); new points "
                            "are dropped (counted in stats.points_dropped) until the collector takes the "
                            "spooled ones", self.run, self.spool_dir, self.spool.max_bytes)

    def _head(self) -> Optional[dict]:
        """The oldest undelivered envelope: the spool's head, else the outbox's."""
        if self.spool:
            try:
                envelope = self.spool.peek()
            except OSError as exc:
                self._warn_once("spool-read", "moxco: cannot read the spool %s: %s", self.spool_dir, exc)
                envelope = None
            if envelope is not None:
                return envelope
        return self._outbox[0] if self._outbox else None

    def _done_with(self, envelope: dict) -> None:
        """``envelope`` was delivered or refused for good: remove it wherever it is now (a spill may
        have moved it from the outbox to the spool while it was in flight)."""
        if self.spool and self.spool.peek() is not None and self.spool.peek()["id"] == envelope["id"]:
            self.spool.pop()
        elif self._outbox and self._outbox[0]["id"] == envelope["id"]:
            self._outbox.popleft()
            self._memory_points -= envelope["points"]

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # --- the sender thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.poll_every
        while True:
            try:
                with self._cond:
                    now = time.monotonic()
                    if self._points and (now - self._points_since >= self.linger or self._closing):
                        self._cut_batch()
                    if self._acks and (now - self._acks_since >= self.linger or self._closing):
                        self._cut_acks()
                    envelope = self._head()
                    if envelope is None:
                        if self._closing or self._closed:
                            return
                        if now < next_poll:
                            waits = [next_poll - now]
                            if self._points:
                                waits.append(self.linger - (now - self._points_since))
                            if self._acks:
                                waits.append(self.linger - (now - self._acks_since))
                            self._cond.wait(max(0.01, min(waits)))
                            continue
                    elif self._closing and time.monotonic() >= self._deadline:
                        return
                    self._busy = envelope is not None
                if envelope is None:
                    # idle: ask for decisions; after a failed poll, back off like a failed send
                    failures = self._poll_failures = 0 if self._poll() else self._poll_failures + 1
                    wait = self.poll_every if not failures else min(self.max_backoff, self.backoff * 2 ** min(failures, 30))
                    next_poll = time.monotonic() + max(wait, self.poll_every)
                    continue
                outcome, delay = self._deliver(envelope)
                if outcome != _RETRY and envelope.get("probes"):
                    self._answer(envelope["probes"])  # (its decisions were handed over first)
                with self._cond:
                    self._busy = False
                    if outcome == _RETRY:
                        self._offline = True
                        self._spill()
                        if self._closing and delay is None:
                            return  # the collector is gone: leave the rest in the spool
                    else:
                        self._offline = False
                        self._attempt = 0
                        self._done_with(envelope)
                        next_poll = time.monotonic() + self.poll_every
                    self._cond.notify_all()
                if outcome == _RETRY:
                    self._sleep(delay)
            except Exception as exc:  # the sender must survive anything; say so once
                self._warn_once("sender", "moxco: run %r: the sender thread hit %s: %s (it goes on)", self.run,
                                type(exc).__name__, exc)
                with self._cond:
                    self._busy = False
                time.sleep(0.1)

    def _sleep(self, retry_after: Optional[float]) -> None:
        """Back off before the next attempt: ``Retry-After`` when the collector gave one, else
        exponential (``backoff · 2^n``, capped at ``max_backoff``) with equal jitter."""
        if retry_after is not None:
            delay = min(retry_after, max(self.max_backoff, 60.0))
        else:
            ceiling = min(self.max_backoff, self.backoff * (2 ** min(self._attempt, 30)))
            delay = random.uniform(ceiling / 2, ceiling)
        self._attempt += 1
        end = time.monotonic() + delay
        with self._cond:
            while True:
                if self._closing and retry_after is None:
                    return  # closing: the loop tries once more now, then leaves the rest spooled
                limit = min(end, self._deadline) if self._closing else end
                left = limit - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _request(self, method: str, path: str, body: Any = None) -> Response:
        self.stats.requests += 1
        return self._client.request(method, path, body)

    def _run_path(self) -> str:
        return f"{API}/runs/{quote(self.run, safe='')}"

    def _deliver(self, envelope: dict) -> Tuple[str, Optional[float]]:
        """Send one envelope; ``(outcome, retry_after)`` with outcome ok / rejected / retry."""
        kind, body, run = envelope["kind"], envelope["body"], self._run_path()
        method, path = {"run": ("PUT", run), "status": ("PATCH", run), "batch": ("POST", f"{run}/batches"),
                        "ack": ("POST", f"{run}/decisions/{quote(str(body.get('decision_id')), safe='')}/ack")}[kind]
        payload = {k: v for k, v in body.items() if k != "decision_id"} if kind == "ack" else body
        try:
            response = self._request(method, path, payload)
            if response.status == 404 and kind in ("batch", "status"):
                # the collector does not know the run (a fresh store): register it again, retry once
                with self._cond:
                    registration = json.loads(json.dumps(self._registration or {"config": {}, "status": "running"}))
                again = self._request("PUT", run, registration)
                if 200 <= again.status < 300:
                    response = self._request(method, path, payload)
        except Unreachable as exc:
            self.stats.failed_requests += 1
            self._warn_once("unreachable", "moxco: run %r: the collector at %s is unreachable (%s); spooling to %s "
                            "and retrying in the background", self.run, self.url, exc, self.spool_dir)
            return _RETRY, None
        status = response.status
        if 200 <= status < 300 and not (isinstance(response.body, Mapping) and (
                kind != "batch" or response.body.get("batch_id") == body.get("batch_id"))):
            # not the collector's answer (an HTML page from a proxy, a truncated or foreign body): the
            # batch may not be stored, so keep it and retry; its batch id makes a retry that lands twice a no-op
            self.stats.failed_requests += 1
            self._warn_once("garbage", "moxco: run %r: %s %s answered %d with something that is not the collector's "
                            "JSON (%r); keeping the data in the spool %s and retrying", self.run, method, path, status,
                            str(response.body)[:120], self.spool_dir)
            return _RETRY, None
        if 200 <= status < 300:
            if "unreachable" in self._warned or "retry" in self._warned:
                log.info("moxco: run %r: the collector at %s answers again", self.run, self.url)
                self._warned.discard("unreachable")
                self._warned.discard("retry")
            if kind == "batch":
                self.stats.batches_sent += 1
                self.stats.points_sent += envelope["points"]
                if isinstance(response.body, Mapping):
                    self.stats.duplicate_batches += bool(response.body.get("duplicate"))
            self._hand_over(response.body)
            return _OK, None
        if status >= 500 or status == 429 or status in (401, 403):
            self.stats.failed_requests += 1
            level = logging.ERROR if status in (401, 403) else logging.WARNING
            if "retry" not in self._warned:
                self._warned.add("retry")
                log.log(level, "moxco: run %r: the collector answered %d to %s %s: %s; keeping the data in the spool "
                        "%s and retrying", self.run, status, method, path, response.message, self.spool_dir)
            return _RETRY, response.retry_after
        # any other 4xx: this envelope will never be accepted
        self.stats.points_rejected += envelope["points"]
        log.error("moxco: run %r: the collector refused %s %s with %d: %s (%d points not stored; not retried)",
                  self.run, method, path, status, response.message, envelope["points"])
        return _REJECTED, None

    def _poll(self) -> bool:
        """``GET …/decisions/pending`` while idle, so a decision reaches an agent that sends nothing.
        Returns whether the collector answered."""
        try:
            response = self._request("GET", f"{self._run_path()}/decisions/pending")
        except Unreachable:
            self.stats.failed_requests += 1
            return False
        if response.status == 200:
            self._hand_over(response.body)
        return response.status < 500

    def _answer(self, steps: List[int]) -> None:
        if self.on_answer is not None:
            try:
                self.on_answer(list(steps))
            except Exception as exc:
                self._warn_once("on_answer", "moxco: run %r: the answer callback failed: %s", self.run, exc)

    def _hand_over(self, body: Any) -> None:
        """Give unacknowledged decisions of a response to the agent, each id at most once; one that
        does not parse is acknowledged as rejected (at its own step) rather than left pending."""
        items = body.get("decisions") if isinstance(body, Mapping) else body
        if not isinstance(items, list) or self.on_decision is None:
            return
        for item in items:
            try:
                decision = Decision.from_json(item)
            except (KeyError, TypeError, ValueError) as exc:
                self._warn_once("decision", "moxco: run %r: rejecting a malformed decision %r (%s)", self.run, item, exc)
                ident = item.get("id") if isinstance(item, Mapping) else None
                step = item.get("step") if isinstance(item, Mapping) else None
                if isinstance(ident, str) and ident not in self._acked and isinstance(step, int) and step >= 0:
                    self._acknowledge(ident, step, rejected=f"malformed decision: {exc}"[:1000])
                continue
            ident = decision.with_run(decision.run or self.run).id
            if ident in self._acked or ident in self._seen or decision.applied_step is not None:
                continue
            self._seen.add(ident)
            self.stats.decisions_received += 1
            try:
                self.on_decision(ident, decision)
            except Exception as exc:
                self._warn_once("on_decision", "moxco: run %r: the decision callback failed: %s", self.run, exc)

    # --- one agent per spool directory -----------------------------------------------------------------

    def _lock_spool_dir(self) -> Optional[Any]:
        """Hold an exclusive lock on the spool directory; another live agent with the same run name
        (and so the same directory) gets a private sibling directory instead of a shared one."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return None
        for candidate in (self.spool_dir, self.spool_dir.with_name(f"{self.spool_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}")):
            candidate.mkdir(parents=True, exist_ok=True)
            handle = open(candidate / "lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                log.warning("moxco: run %r: another agent holds the spool %s; using a private one", self.run, candidate)
                continue
            self.spool_dir = candidate
            return handle
        return None  # pragma: no cover

    def _unlock_spool_dir(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __repr__(self) -> str:
        return f"HttpSink({self.url!r}, run={self.run!r}, {asdict(self.stats)})"
