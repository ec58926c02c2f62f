"""Where the agent's points go: the ``Sink`` protocol, ``open_sink`` (an ``http(s)://`` URL gives the
HTTP sink, ``agent.transport.HttpSink``; any other the embedded one), and the embedded sink, the
agent's ``Sink`` on a ``Store`` in this process (``attach(url="sqlite:…")``).

The embedded sink makes the store's own calls (``open_run``, ``put_run``, ``ingest``, ``set_status``,
``decisions``), on the writer thread, so the same store code registers the run with its decision
policy and decides on the goodness points of each batch, as the collector does for an agent over
HTTP. The decisions an ingest answers as pending (the policy's, an operator's) are handed to
``on_decision(ident, Decision)``, each id once; then the goodness probes of the batch are reported
to ``on_answer(steps)`` (the store has run the policy on them, or cannot now: an agent waiting for
the answer to a probe goes on).

When the database cannot be opened (a PostgreSQL server that is down, a read-only folder) or a
write fails for want of it (a lost connection), the calls go, in order, to a spool on disk
(``agent.spool``) and the sink tries the database again every ``retry_every`` seconds, replaying
the spool first when it answers; whatever is still spooled at ``close`` stays on disk for ``moxco
spool push``. Training never waits for this: the calls come from the writer thread. Bad input (a
``StoreError``) is not the database's absence and is raised as before.

A store file deleted or replaced under the job (``StoreLostError``), or a run that vanished from it
(``NotFoundError``), is noticed at the next write: the store is opened again at the same URL (a new
file), the run registered again with everything registered so far, the write done again, and the
agent told once what was lost (``agent.errors["store"]``).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

from moxco.agent.spool import (SinkStats, Sessions, Spool, StoreReplay, default_spool_dir, has_segments,
                               lock_spool_dir, remove_spool_dir)
from moxco.decision import Decision
from moxco.policy import probe_steps
from moxco.wire import encode_point

log = logging.getLogger("moxco.agent")

_UNSET: Any = object()  # put_run: "leave as registered"


@runtime_checkable
class Sink(Protocol):
    """What the agent and its writer need from where points go: the embedded store
    (``EmbeddedSink``, below) or a collector (``agent.transport.HttpSink``). The calls are the store's own
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
    ``url`` (``EmbeddedSink``, which spools while the store cannot be opened or written).
    Never raises for a store that is away."""
    if is_http_url(url):
        from moxco.agent.transport import HttpSink

        return HttpSink(url, run, token=token, on_decision=on_decision, on_answer=on_answer, on_error=on_error,
                        on_run=on_run, **options)
    ignored = sorted(set(options) - set(EMBEDDED_OPTIONS))
    if ignored:  # e.g. a script with transport options run with MOXCO_URL pointing at a file
        log.warning("moxco: transport options %s apply to an http(s):// collector only; ignored for %s", ignored, url)
    return EmbeddedSink(url=url, run=run, on_decision=on_decision, on_answer=on_answer, on_error=on_error,
                        on_run=on_run, **{k: v for k, v in options.items() if k in EMBEDDED_OPTIONS})


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is not there (rather than that the input is bad)."""
    from sqlalchemy import exc as sa_exc

    from moxco.collector.store import StoreError

    if isinstance(exc, StoreError):
        return False
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DBAPIError, OSError))


class EmbeddedSink:
    """``Sink`` over ``store`` (closed with the sink when ``owns_store``), or over the store at
    ``url``, opened now or, while it cannot be, later (see the module docstring). ``on_error(part,
    exc)`` is told when the store is away, what could not be stored, and what is left at close."""

    def __init__(self, store: Any = None, *, url: Optional[str] = None, run: str = "",
                 on_decision: Optional[Callable[[str, Decision], None]] = None,
                 on_answer: Optional[Callable[[List[int]], None]] = None,
                 on_error: Optional[Callable[[str, BaseException], None]] = None,
                 on_run: Optional[Callable[[Any], None]] = None, owns_store: bool = True,
                 spool_dir: Optional[Path] = None, spool_max_bytes: int = 1 << 30, retry_every: float = 5.0) -> None:
        self.store = store
        self.url = url if url is not None else getattr(store, "url", None)
        self.on_decision, self.on_error, self.on_run = on_decision, on_error, on_run
        self.on_answer = on_answer
        self._registration: Dict[str, Any] = {}  # everything the run was registered with (to register it again)
        self.owns_store = owns_store
        self.stats = SinkStats()
        self.requested = self.run = run
        self.session: Optional[str] = None
        self.retry_every = float(retry_every)
        self.spool_dir = Path(spool_dir) if spool_dir is not None else (default_spool_dir(run) if run else None)
        self.spool_max_bytes = int(spool_max_bytes)
        self.spool: Optional[Spool] = None
        self._lock_file = None
        self._sessions: Optional[Sessions] = None
        self._opened = False  # open_run was called: calls address this sink's run
        self._run_known = True  # the name of this sink's run is known (not waiting for a spooled open)
        self._next_try = 0.0
        self._down_since: Optional[float] = None
        self._seen: set[str] = set()  # decision ids already handed to the agent
        self._seq = 0
        if self.store is None and self.url is not None:
            self._connect()
        if self.spool_dir is not None and has_segments(self.spool_dir):
            self._open_spool()
            self.stats.spool_leftover = True
            log.warning("moxco: run %r: replaying %d bytes an earlier agent left in the spool %s", run,
                        self.spool.bytes, self.spool_dir)
            self._drain()

    # --- the Sink calls (the writer thread) -------------------------------------------------------

    def open_run(self, name: str, *, resume: Any = False, session: Optional[str] = None, **fields: Any) -> Any:
        """``Store.open_run``; None when the store is away (the run is opened when it answers, and
        ``on_run`` is told then)."""
        self._opened, self.requested, self.session = True, name, session or uuid.uuid4().hex[:16]
        self._remember(fields)
        self.run, self._run_known = name, False
        body = {"name": name, "resume": resume, "session": self.session, **fields}
        opened = self._call("open", body, lambda: self.store.open_run(name, resume=resume, session=self.session,
                                                                     **fields))
        if opened is not None:
            self._opened_as(opened, notify=False)  # (answered now: the caller has it)
        return opened

    def put_run(self, name: str, **fields: Any) -> Any:
        """``Store.put_run``: register or update the run (config merged; optimizer, policy, status)."""
        create = fields.pop("create", True)
        self._remember(fields)
        kind = "run" if create else "status"
        return self._call(kind, fields, lambda: self.store.put_run(self._name(name), create=create, **fields), name)

    def ingest(self, name: str, points: Iterable[Any], *, acks: Sequence[Tuple] = ()) -> Any:
        """``Store.ingest`` of the points and acknowledgements; hands the pending decisions over.
        Returns the ``IngestResult`` (None while the store is away: the batch is spooled)."""
        points = list(points)
        self.stats.points_enqueued += len(points)
        body = {"points": None,
                "acks": [{"decision_id": a[0], "applied_step": int(a[1]), **({"rejected": a[2]} if len(a) > 2 and
                                                                           a[2] is not None else {})} for a in acks]}
        result = self._call("batch", body, lambda: self.store.ingest(self._name(name), points, acks=acks), name,
                            points=len(points), encode=lambda: [encode_point(p) for p in points])
        if result is not None:
            self.stats.points_sent += len(points)
            self._hand_over(result.pending)
        self._answer(points)  # (spooled: the policy cannot answer now)
        return result

    def set_status(self, name: str, status: str) -> None:
        self._call("status", {"status": status}, lambda: self.store.set_status(self._name(name), status), name)

    def decisions(self, name: str) -> List[Decision]:
        """Every decision of the run, with its acknowledgement (none while the store is away)."""
        if not self._ready():
            return []
        return self.store.decisions(self._name(name))

    def sync(self, timeout: float = 10.0) -> bool:
        """Everything handed over is stored or on disk: the calls are synchronous, the spool flushed."""
        if self.spool:
            self._drain()
        return not self.spool

    def close(self) -> None:
        """Replay what is spooled if the store is back; what is left stays on disk and is said."""
        if self.spool:
            self._next_try = 0.0
            self._drain()
        if self.spool is not None:
            left = bool(self.spool)
            self.stats.points_left = self.spool.points_left() if left else 0
            if left:  # (said before the spool closes: the agent stores what it is told with the run)
                self._report("spool", RuntimeError(
                    f"{self.stats.points_left} points left in the spool (the store could not be written): send them "
                    f"with `moxco spool push {self.spool_dir} --store {self.url}`"))
            self.spool.close()
            if not left:
                remove_spool_dir(self.spool_dir)
            if self._lock_file is not None:
                self._lock_file.close()
        if self.owns_store and self.store is not None:
            self.store.close()

    # --- direct or spooled ------------------------------------------------------------------------

    def _name(self, name: str) -> str:
        return self.run if self._opened and name == self.requested else name

    def _spooling(self) -> bool:
        return bool(self.spool) or not self._ready()

    def _call(self, kind: str, body: dict, direct: Callable[[], Any], name: Optional[str] = None, *,
              points: int = 0, encode: Optional[Callable[[], list]] = None) -> Any:
        from moxco.collector.store import NotFoundError, StoreLostError

        if not self._spooling():
            try:
                try:
                    return direct()
                except (StoreLostError, NotFoundError) as exc:
                    if not self._opened or (isinstance(exc, NotFoundError) and kind == "open"):
                        raise
                    self._recover(exc)
                    return direct()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                self._went_down(exc)
        if encode is not None and body.get("points") is None:
            body = {**body, "points": encode()}
        self._to_spool(kind, body, name, points)
        self._drain()
        return None

    def _remember(self, fields: Dict[str, Any]) -> None:
        for key, value in fields.items():
            if key == "config" and value is not None:
                self._registration["config"] = {**self._registration.get("config", {}), **dict(value)}
            elif key in ("optimizer", "policy") or (key == "status" and value is not None):
                self._registration[key] = value

    def _recover(self, exc: BaseException) -> None:
        """After ``StoreLostError`` (the file went) or ``NotFoundError`` (the run went): open the
        store again at its URL, register the run again, say once what was lost."""
        from moxco.collector.store import StoreError, StoreLostError, open_store

        if isinstance(exc, StoreLostError):
            old, self.store = self.store, open_store(self.url)
            if self.owns_store:
                try:
                    old.close()
                except Exception:  # noqa: BLE001 - the old file is gone anyway
                    pass
            self.owns_store = True
        self.store.put_run(self.run, session=self.session,
                           **{k: v for k, v in self._registration.items() if k != "status"})
        lost = ("the store file was deleted or replaced" if isinstance(exc, StoreLostError)
                else f"run {self.run!r} vanished from the store")
        self._report("store", StoreError(
            f"{lost} while this job was writing to it: the points written before are lost ({exc}). The run is "
            f"registered again in {self.url} and the points from now on are kept there"))

    def _answer(self, points: List[Any]) -> None:
        probes = probe_steps(points) if self.on_answer is not None else ()
        if probes:
            try:
                self.on_answer(probes)
            except Exception as exc:  # noqa: BLE001 - as the decision callback
                log.warning("moxco: the answer callback failed for probes %s: %s", probes, exc)

    def _to_spool(self, kind: str, body: dict, name: Optional[str], points: int) -> None:
        self._seq += 1
        envelope = {"kind": kind, "id": f"{self.session or 'embedded'}-{self._seq:06d}", "body": body,
                    "points": points, "session": self.session,
                    "run": self._name(name or "") if kind != "open" and self._run_known else None}
        if kind == "batch":
            body["batch_id"] = envelope["id"]
        try:
            self._open_spool()
            refused = self.spool.append([envelope])
        except OSError as exc:
            self._report("store", OSError(f"cannot write the spool {self.spool_dir} ({exc}); {points} points dropped"))
            refused = [envelope] if points else []
        if refused:
            self.stats.points_dropped += points
            self._report("store", RuntimeError(f"the spool {self.spool_dir} is full (spool_max_bytes="
                                               f"{self.spool_max_bytes}); new points are dropped and counted"))
        else:
            self.stats.points_spooled += points

    def _open_spool(self) -> None:
        if self.spool is not None:
            return
        if self.spool_dir is None:
            raise OSError("no spool directory (a run name is needed)")
        self.spool_dir, self._lock_file = lock_spool_dir(self.spool_dir, self.run)
        self.spool = Spool(self.spool_dir, self.spool_max_bytes)
        self._sessions = Sessions(self.spool_dir)

    def _drain(self) -> None:
        """Replay the spool into the store, oldest first, while the store takes it."""
        if not self.spool or not self._ready():
            return
        replay = StoreReplay(self.store, self._sessions, self.requested or self.run)
        while self.spool:
            envelope = self.spool.peek()
            if envelope is None:
                break
            try:
                result = replay.deliver(envelope)
            except Exception as exc:
                if _unavailable(exc):
                    self._went_down(exc)
                    return
                self.stats.points_rejected += int(envelope.get("points") or 0)
                self._report("store", exc)
            else:
                if envelope["kind"] == "open" and envelope.get("session") == self.session and result is not None:
                    self._opened_as(result)
                elif envelope["kind"] == "batch" and result is not None:
                    self.stats.points_sent += int(envelope.get("points") or 0)
                    self._hand_over(result.pending)
            self.spool.pop()

    def _ready(self) -> bool:
        """Whether the store is open and not known to be down (tried again every ``retry_every`` s)."""
        if self.store is not None and self._down_since is None:
            return True
        if time.monotonic() < self._next_try:
            return False
        return self._connect()

    def _connect(self) -> bool:
        if self.store is None:
            try:
                from moxco.collector.store import open_store

                self.store = open_store(self.url)
            except Exception as exc:
                self._went_down(exc)
                return False
        elif self._down_since is not None:
            try:
                self.store.ping()
            except Exception as exc:
                self._went_down(exc)
                return False
        if self._down_since is not None:
            log.warning("moxco: run %r: the store at %s answers again; the spool is replayed first", self.run, self.url)
            self._down_since = None
        return True

    def _went_down(self, exc: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_every
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self._warned_down:  # once per sink (agent.errors keeps the first failure)
            self._warned_down = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._report("store", RuntimeError(
                f"the store at {self.url} cannot be written ({type(exc).__name__}: {first}); spooling to "
                f"{self.spool_dir} and trying again every {self.retry_every:g} s"))

    _warned_down = False

    def _opened_as(self, opened: Any, notify: bool = True) -> None:
        self.run, self._run_known = opened.run.name, True
        if self._sessions is not None and self.session:
            self._sessions.record(self.session, self.run)
        if notify and self.on_run is not None:
            self.on_run(opened)

    def _report(self, part: str, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(part, exc)
        else:
            log.warning("moxco: run %r: %s", self.run, exc)

    def _hand_over(self, pending: List[Decision]) -> None:
        if self.on_decision is None:
            return
        for decision in pending:
            if decision.id in self._seen:
                continue
            self._seen.add(decision.id)
            self.stats.decisions_received += 1
            try:
                self.on_decision(decision.id, decision)
            except Exception as exc:  # noqa: BLE001 - the agent's callback must not fail the write
                log.warning("moxco: the decision callback failed for %s: %s", decision.id, exc)

    def __repr__(self) -> str:
        return f"EmbeddedSink({self.url!r}, run={self.run!r})"
