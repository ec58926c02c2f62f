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

from moxco.agent.spool import (SinkStats, Sessions, Spool, default_spool_dir, lock_spool_dir,  # noqa: F401 (re-exported)
                               remove_spool_dir)
from moxco.collector.store.base import OpenedRun
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
    the sink was opened with, each id once. ``open_run`` is the agent's registration (run identity:
    ``Store.open_run``), answered now when the store answers, else later through ``on_run``;
    ``sync`` makes what was handed over durable (stored, or on disk in the spool); ``stats``
    counts points (``agent.spool.SinkStats``)."""

    def open_run(self, name: str, *, resume: Any = False, session: Optional[str] = None, **fields: Any) -> Any: ...

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = _UNSET,
                policy: Any = _UNSET, status: Optional[str] = None, create: bool = True) -> Any: ...

    def ingest(self, name: str, points: Iterable[Any], *, acks: Sequence[Tuple] = ()) -> Any: ...

    def set_status(self, name: str, status: str) -> None: ...

    def decisions(self, name: str) -> List[Decision]: ...

    def sync(self, timeout: float = 10.0) -> bool: ...

    def close(self) -> None: ...


def is_http_url(url: Optional[str]) -> bool:
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


EMBEDDED_OPTIONS = ("spool_dir", "spool_max_bytes")


def open_sink(url: str, run: str, *, token: Optional[str] = None,
              on_decision: Optional[Callable[[str, Decision], None]] = None,
              on_answer: Optional[Callable[[List[int]], None]] = None,
              on_error: Optional[Callable[[str, BaseException], None]] = None,
              on_run: Optional[Callable[[Any], None]] = None, **options: Any) -> Sink:
    """An ``HttpSink`` for an ``http(s)://`` collector URL, else the embedded sink on the store at
    ``url`` (``agent.sink.EmbeddedSink``, which spools while the store cannot be opened or written).
    Never raises for a store that is away."""
    if is_http_url(url):
        return HttpSink(url, run, token=token, on_decision=on_decision, on_answer=on_answer, on_error=on_error,
                        on_run=on_run, **options)
    ignored = sorted(set(options) - set(EMBEDDED_OPTIONS))
    if ignored:  # e.g. a script with transport options run with MOXCO_URL pointing at a file
        log.warning("moxco: transport options %s apply to an http(s):// collector only; ignored for %s", ignored, url)
    from moxco.agent.sink import EmbeddedSink

    return EmbeddedSink(url=url, run=run, on_decision=on_decision, on_answer=on_answer, on_error=on_error,
                        on_run=on_run, **{k: v for k, v in options.items() if k in EMBEDDED_OPTIONS})


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


TransportStats = SinkStats  # (the name the HTTP sink's counters had)


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
                 on_error: Optional[Callable[[str, BaseException], None]] = None,
                 on_run: Optional[Callable[[Any], None]] = None, session: Optional[str] = None,
                 spool_dir: Optional[os.PathLike | str] = None, spool_max_bytes: int = 1 << 30,
                 batch_points: int = 5000, linger: float = 0.5, max_memory_points: int = 200_000,
                 timeout: float = 10.0, backoff: float = 0.25, max_backoff: float = 10.0,
                 poll_every: float = 2.0, close_timeout: float = 10.0) -> None:
        if batch_points < 1 or max_memory_points < batch_points:
            raise ValueError("batch_points must be ≥ 1 and max_memory_points ≥ batch_points")
        self.url, self.run, self.requested = url.rstrip("/"), run, run
        self.on_decision, self.on_error, self.on_run = on_decision, on_error, on_run
        self.on_answer = on_answer
        self.batch_points, self.linger, self.max_memory_points = int(batch_points), float(linger), int(max_memory_points)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.poll_every, self.close_timeout, self.timeout = float(poll_every), float(close_timeout), float(timeout)
        self._token = token if token is not None else os.environ.get("MOXCO_TOKEN")
        self._client = Client(self.url, self._token, timeout)
        self.stats = TransportStats()

        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir(run)
        try:
            self.spool_dir, self._lock_file = lock_spool_dir(self.spool_dir, run)
        except OSError as exc:  # e.g. a read-only home: a private temporary spool rather than no job
            fallback = Path(tempfile.mkdtemp(prefix="moxco-spool-")) / self.spool_dir.name
            log.warning("moxco: run %r: cannot use the spool directory %s (%s); using %s (set $MOXCO_SPOOL or "
                        "transport={'spool_dir': ...})", run, self.spool_dir, exc, fallback)
            self.spool_dir, self._lock_file = lock_spool_dir(fallback, run)
        self.spool = Spool(self.spool_dir, spool_max_bytes)
        self.stats.spool_leftover = self.spool.leftover
        if self.spool.leftover:
            log.warning("moxco: run %r: replaying %d bytes an earlier agent left in the spool %s", run,
                        self.spool.bytes, self.spool_dir)
        self._acked_path = self.spool_dir / "acked"
        self._acked = set(self._acked_path.read_text().split()) if self._acked_path.exists() else set()
        self._seen: set[str] = set()  # decision ids already handed to the agent
        self._sessions = Sessions(self.spool_dir)  # the run each writer session opened
        self._refused: set = set()  # sessions whose open the collector refused for good
        self._run_known = True  # False from open_run until the collector says which run it opened
        self._opened: Optional[OpenedRun] = None
        self._open_answered = threading.Event()  # the collector answered our open, or did not answer
        self._open_waiting = False  # open_run is waiting for that answer
        self._open_refused: Optional[Tuple[int, str]] = None  # the collector refused it: (status, why)

        self._session = session or uuid.uuid4().hex[:16]
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

    def open_run(self, name: str, *, resume: Any = False, session: Optional[str] = None, wait: float = 5.0,
                 **fields: Any) -> Optional[OpenedRun]:
        """Open the run for writing (``POST /runs``: run identity, ``Store.open_run``). The request
        goes first, through the sender; this waits up to ``wait`` seconds for the answer and returns
        the ``OpenedRun``, or None when the collector did not answer by then (the request stays
        queued or spooled, and ``on_run`` is told when it is answered). Everything queued before the
        answer goes to the run it opened."""
        if session:
            self._session = session
        body = {"name": name, "resume": resume, "session": self._session,
                **{k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in fields.items()}}
        with self._cond:
            self.requested = self.run = name
            self._run_known = False
            self._open_answered.clear()
            registration = {"config": dict(fields.get("config") or {}), "status": "running"}
            for key in ("optimizer", "policy"):
                if key in fields:
                    registration[key] = body[key]
            self._registration = registration
            self._open_waiting = True  # an answer now is returned here, not through on_run
            self._enqueue("open", json.loads(json.dumps(body)))
            self._cond.notify_all()
        self._open_answered.wait(wait)
        with self._cond:
            self._open_waiting = False
            if self._open_refused is not None:  # the collector said no (no run to resume, another live writer…)
                from moxco.collector.store import ConflictError, NotFoundError, StoreError

                status, message = self._open_refused
                raise {404: NotFoundError, 409: ConflictError}.get(status, StoreError)(message)
            return self._opened

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = _UNSET,
                policy: Any = _UNSET, status: Optional[str] = None, create: bool = True,
                policy_state: Optional[Mapping[str, Any]] = None) -> None:
        """Register (or update) the run: ``PUT /runs/{run}`` with the registration so far (config
        merged, optimizer and policy as last given; the collector's ingest runs the policy).
        ``create=False``: ``PATCH``, the run must exist. ``policy_state`` (a checkpoint's) goes
        with this request only."""
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
            snapshot = json.loads(json.dumps(body))
            if policy_state is not None:
                snapshot["policy_state"] = json.loads(json.dumps(policy_state))
            self._enqueue("run" if create else "status", snapshot)

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

    def sync(self, timeout: float = 10.0) -> bool:
        """Make what was handed over durable: delivered within ``timeout``, else moved to the spool
        on disk (a process killed after this loses none of it). Returns whether all was delivered."""
        if self.flush(timeout):
            return True
        with self._cond:
            self._cut_batch()
            self._cut_acks()
            self._spill()
        return False

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
            self.stats.points_left = self.spool.points_left() if left else 0
            self.spool.close()
        if not self._thread.is_alive():
            self._client.close()
        if left:
            self._report("spool", RuntimeError(
                f"{self.stats.points_left} points left in the spool (not delivered before close): send them with "
                f"`moxco spool push {self.spool_dir} --url {self.url}` (an agent attached with the same run name "
                "replays them first too)"))
        s = self.stats
        if s.points_dropped or s.points_rejected:
            log.warning("moxco: run %r: %d points dropped (spool full) and %d rejected by the collector",
                        self.run, s.points_dropped, s.points_rejected)
        if not left:  # all delivered, acknowledgements included: nothing worth keeping on disk
            remove_spool_dir(self.spool_dir)  # (the lock file goes while still locked: no other agent holds it)
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
    def failing(self) -> bool:
        """Whether the last delivery failed (the collector away, or refusing the token)."""
        return self._offline

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
        envelope = {"kind": kind, "id": self._next_id(), "body": body, "points": points, "session": self._session,
                    "run": self.run if kind != "open" and self._run_known else None}
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
                        if envelope["kind"] == "open" and envelope.get("session") == self._session:
                            self._open_answered.set()  # unanswered: the run is opened when the collector is back
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

    def _run_path(self, name: Optional[str] = None) -> str:
        return f"{API}/runs/{quote(name or self.run, safe='')}"

    def _deliver(self, envelope: dict) -> Tuple[str, Optional[float]]:
        """Send one envelope; ``(outcome, retry_after)`` with outcome ok / rejected / retry."""
        kind, body = envelope["kind"], envelope["body"]
        if envelope.get("session") in self._refused and kind != "open":
            self.stats.points_rejected += envelope["points"]
            return _REJECTED, None  # its run was never opened (the collector refused it): said when refused
        run = self._run_path(self._sessions.run_of(envelope, self.run))
        method, path = {"open": ("POST", f"{API}/runs"), "run": ("PUT", run), "status": ("PATCH", run),
                        "batch": ("POST", f"{run}/batches"),
                        "ack": ("POST", f"{run}/decisions/{quote(str(body.get('decision_id')), safe='')}/ack")}[kind]
        payload = {k: v for k, v in body.items() if k != "decision_id"} if kind == "ack" else body
        try:
            response = self._request(method, path, payload)
            if response.status == 404 and kind == "open" and payload.get("resume") == "must":
                with self._cond:
                    if envelope.get("session") == self._session and self._open_waiting:
                        # attach is waiting: it fails there, saying so; nothing of this session is sent
                        self._open_refused = (404, response.message)
                        self._refused.add(self._session)
                        self._open_answered.set()
                        return _REJECTED, None
                self._report("run", RuntimeError(f"no run named {payload.get('name')!r} to resume (resume='must'); "
                                                 "the points go to a new run of that name"))
                response = self._request(method, path, {**payload, "resume": True})
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
            if kind == "open":
                return self._opened_as(envelope, response.body), None
            self._hand_over(response.body)
            return _OK, None
        if status >= 500 or status == 429 or status in (401, 403):
            self.stats.failed_requests += 1
            level = logging.ERROR if status in (401, 403) else logging.WARNING
            if status in (401, 403) and "auth" not in self._warned:
                self._warned.add("auth")
                self._report("store", RuntimeError(
                    f"the collector at {self.url} refused the token ({status}: {response.message}); the data stays "
                    f"in the spool {self.spool_dir}: send it with the right token, `moxco spool push {self.spool_dir} "
                    f"--url {self.url} --token …`, or attach again with the same run name and the right token"))
            if "retry" not in self._warned:
                self._warned.add("retry")
                log.log(level, "moxco: run %r: the collector answered %d to %s %s: %s; keeping the data in the spool "
                        "%s and retrying", self.run, status, method, path, response.message, self.spool_dir)
            return _RETRY, response.retry_after
        # any other 4xx: this envelope will never be accepted
        if kind == "open":
            self._refused.add(envelope.get("session"))
            with self._cond:
                waiting = envelope.get("session") == self._session and self._open_waiting
                if waiting:  # attach fails, saying why
                    self._open_refused = (status, response.message)
            if not waiting:
                self._report("run", RuntimeError(f"the collector refused to open run {body.get('name')!r} ({status}: "
                                                 f"{response.message}); this session's points are not stored"))
            if envelope.get("session") == self._session:
                self._open_answered.set()
        self.stats.points_rejected += envelope["points"]
        log.error("moxco: run %r: the collector refused %s %s with %d: %s (%d points not stored; not retried)",
                  self.run, method, path, status, response.message, envelope["points"])
        return _REJECTED, None

    def _poll(self) -> bool:
        """``GET …/decisions/pending`` while idle, so a decision reaches an agent that sends nothing.
        Returns whether the collector answered."""
        if not self._run_known:  # the run is not open yet
            return True
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

    def _opened_as(self, envelope: dict, body: Any) -> str:
        """The collector opened a session's run: later envelopes of that session go to it (recorded
        in ``<spool>/sessions`` for a later process too); for this sink's own session, the agent
        learns its run (``on_run``)."""
        try:
            opened = OpenedRun.from_json(body)
        except (KeyError, TypeError, ValueError, AttributeError):
            self._warn_once("garbage", "moxco: run %r: POST /runs answered with something that is not a run (%r); "
                            "retrying", self.run, str(body)[:120])
            return _RETRY
        session = envelope.get("session")
        if session:
            self._sessions.record(session, opened.run.name)
        if session == self._session:
            with self._cond:
                self.run, self._run_known, self._opened = opened.run.name, True, opened
                waiting = self._open_waiting
            self._open_answered.set()
            if not waiting and self.on_run is not None:
                try:
                    self.on_run(opened)
                except Exception as exc:
                    self._warn_once("on_run", "moxco: run %r: the run callback failed: %s", self.run, exc)
        return _OK

    def _report(self, part: str, exc: BaseException) -> None:
        """Tell the agent (``on_error``: its errors and log) or, alone, the log."""
        if self.on_error is not None:
            try:
                self.on_error(part, exc)
                return
            except Exception:
                pass
        log.warning("moxco: run %r: %s", self.run, exc)

    def _unlock_spool_dir(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __repr__(self) -> str:
        return f"HttpSink({self.url!r}, run={self.run!r}, {asdict(self.stats)})"
