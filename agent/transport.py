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

The sink's calls (here) only queue; ``agent.delivery.Delivery`` (its mixin) cuts envelopes and runs
the sender thread; ``agent.http_client.Client`` makes the requests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Deque, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

from moxco.agent.delivery import Delivery
from moxco.agent.http_client import API, Client
from moxco.agent.sink import _UNSET
from moxco.agent.spool import (SinkStats, Sessions, Spool, default_spool_dir, lock_spool_dir,  # noqa: F401 (re-exported)
                               remove_spool_dir)
from moxco.collector.store.base import OpenedRun
from moxco.decision import Decision
from moxco.policy import probe_steps
from moxco.wire import encode_point

log = logging.getLogger("moxco.agent.transport")

TransportStats = SinkStats  # (the name the HTTP sink's counters had)


class HttpSink(Delivery):
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

    def _unlock_spool_dir(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __repr__(self) -> str:
        return f"HttpSink({self.url!r}, run={self.run!r}, {asdict(self.stats)})"
