"""The HTTP sink's delivery (``Delivery``, a mixin of ``agent.transport.HttpSink``): envelopes, the
in-memory outbox and the spool, and the sender thread that owns the connection.

What the sink's calls hand over becomes envelopes (a batch of points with the acknowledgements that
ride in it, a run registration, a status, a lone acknowledgement), queued in memory in order after
anything spooled. The sender thread delivers the oldest first, classifies each answer (delivered,
refused for good, retry later), backs off, moves the outbox to the spool while the collector is
away, polls for decisions while idle and hands decisions and answered probes to the agent. The
rules it follows are the transport's (``agent.transport``'s docstring).
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

from moxco.agent.http_client import API, Response, Unreachable
from moxco.collector.store.base import OpenedRun
from moxco.decision import Decision

log = logging.getLogger("moxco.agent.transport")

_OK, _REJECTED, _RETRY = "ok", "rejected", "retry"


class Delivery:
    """Queueing and the sender thread of ``HttpSink``, over the state its ``__init__`` sets: the
    lock ``_cond``, ``_points``/``_probes``/``_acks`` not yet cut, the ``_outbox`` of envelopes,
    the ``spool``, the ``_client``, the counters ``stats``, and the run's session and registration."""

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
