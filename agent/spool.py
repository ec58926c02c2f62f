"""The agent's spool: what could not reach the store yet, on disk, in order, for this or a later process.

Both sinks spool: the HTTP sink while the collector is away (``agent.transport``), the embedded
sink while its database cannot be opened or written (``agent.sink``). A spool is a directory of
append-only JSON-lines segment files (``Spool``), each line one *envelope*: one call of the
``Sink`` protocol, replayable against a collector or a store.

Envelope: ``{"kind", "id", "body", "points", "run", "session"}``. ``kind`` is ``open`` (open the
run for writing: ``Store.open_run``, ``POST /runs``), ``run`` (register or update:
``put_run``, ``PUT /runs/{run}``), ``status`` (``put_run(create=False)``, ``PATCH``), ``batch``
(``ingest`` with acknowledgements; ``id`` is its batch id, so a batch replayed twice is stored once)
or ``ack``. ``run`` is the run's name when the writer knew it; an envelope written before its
session's run was opened has none, and goes to the run its session's ``open`` opened: the sinks
write each session's run name to ``<spool>/sessions`` when they learn it (``Sessions``).

``StoreReplay`` delivers envelopes to a ``Store`` (the embedded sink, ``moxco spool push --url
sqlite:…``); the HTTP sink delivers them as requests. ``moxco spool push`` replays a spool left
behind (``spool_cli``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import quote, unquote

log = logging.getLogger("moxco.agent")

SEGMENT_GLOB = "*.seg"


def spool_root() -> Path:
    """``$MOXCO_SPOOL``, else ``~/.cache/moxco/spool``."""
    return Path(os.environ.get("MOXCO_SPOOL") or Path.home() / ".cache" / "moxco" / "spool").expanduser()


def default_spool_dir(run: str) -> Path:
    """``$MOXCO_SPOOL/<run>``, else ``~/.cache/moxco/spool/<run>`` (the name percent-encoded; a
    very long name is shortened with a hash so it stays a valid file name)."""
    name = quote(run, safe="")
    if len(name.encode()) > 120 or name in (".", ".."):
        name = f"{name[:80]}-{hashlib.sha256(run.encode()).hexdigest()[:16]}"
    return spool_root() / name


def run_of_spool_dir(directory: Path) -> str:
    """The run name a default spool directory was made for (its percent-decoded name)."""
    return unquote(Path(directory).name.split(".", 1)[0])


def has_segments(directory: Path) -> bool:
    """Whether ``directory`` holds spooled data (without creating it)."""
    try:
        return any(p.stat().st_size > 0 for p in Path(directory).glob(SEGMENT_GLOB))
    except OSError:
        return False


def count_points(paths: Iterable[Path], offset: int = 0) -> int:
    """The points in the envelopes of segment files ``paths`` (the first read from byte ``offset``)."""
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                for line in f:
                    try:
                        total += int(json.loads(line).get("points") or 0)
                    except (ValueError, AttributeError):
                        continue
        except OSError:
            pass
        offset = 0
    return total


def segment_paths(directory: Path) -> List[Path]:
    """A spool directory's segment files, oldest first."""
    return sorted(p for p in Path(directory).glob(SEGMENT_GLOB) if p.stem.isdigit())


@dataclass
class SinkStats:
    """Counters of a sink (``agent.store.stats``): points are never lost without being counted.
    ``points_left``: points still in the spool when the sink closed (``moxco spool push`` sends them)."""

    points_enqueued: int = 0
    points_sent: int = 0  # stored, or in batches the collector answered 2xx (duplicates included)
    batches_sent: int = 0
    duplicate_batches: int = 0  # batches the store had stored already (a retry that landed)
    points_rejected: int = 0  # in batches the store refused for good (a 4xx)
    points_dropped: int = 0  # spool full (or unwritable): never sent
    points_spooled: int = 0  # moved to disk while the store was away (counted once per move)
    points_left: int = 0  # in the spool at close
    requests: int = 0
    failed_requests: int = 0  # no response, 5xx, 429, 401/403
    decisions_received: int = 0  # handed to the agent (first sight of each id)
    spool_leftover: bool = False  # an earlier process left a spool, replayed first
    foreground_requests: int = 0  # requests made outside the sender thread (``decisions()`` only)


def lock_spool_dir(directory: Path, run: str, *, exclusive: bool = False) -> Tuple[Path, Optional[Any]]:
    """Hold an exclusive lock on a spool directory: ``(the directory, the lock's handle)``. Another
    live agent with the same run name (and so the same directory) gets a private sibling directory
    instead; with ``exclusive`` (``moxco spool push``) a held directory is an error instead."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        return directory, None
    candidates = [directory] if exclusive else [directory, directory.with_name(
        f"{directory.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}")]
    for candidate in candidates:
        candidate.mkdir(parents=True, exist_ok=True)
        handle = open(candidate / "lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            if exclusive:
                raise RuntimeError(f"a live agent is using the spool {candidate}; wait until it ends") from None
            log.warning("moxco: run %r: another agent holds the spool %s; using a private one", run, candidate)
            continue
        return candidate, handle
    return directory, None  # pragma: no cover


def remove_spool_dir(directory: Path) -> None:
    """Delete a spool directory that holds nothing left to send (its bookkeeping files too); a
    directory with other files is left alone."""
    try:
        for name in ("acked", "sessions", "lock"):
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()
    except OSError:
        pass


class Sessions:
    """``<spool>/sessions``: the run each writer session opened (``session name`` lines), so an
    envelope spooled before its run was opened goes to that run, also from a later process."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "sessions"
        self.names: Dict[str, str] = {}
        try:
            for line in self.path.read_text().splitlines():
                session, _, name = line.partition(" ")
                if session and name:
                    self.names[session] = unquote(name)
        except OSError:
            pass

    def record(self, session: str, name: str) -> None:
        if self.names.get(session) == name:
            return
        self.names[session] = name
        try:
            with open(self.path, "a") as f:
                f.write(f"{session} {quote(name, safe='')}\n")
        except OSError as exc:
            log.warning("moxco: cannot record the run of session %s in %s: %s", session, self.path, exc)

    def run_of(self, envelope: Mapping[str, Any], default: str) -> str:
        """The run an envelope goes to: its own ``run``, else its session's, else ``default``."""
        return envelope.get("run") or self.names.get(envelope.get("session") or "") or default


class Spool:
    """Append-only JSON-lines segment files, read back oldest first.

    ``append`` writes whole lines and flushes (a crash loses at most a partial last line, which the
    reader skips); ``peek``/``pop`` walk the oldest segment, which is deleted once read. Segments
    left by an earlier process are read before anything this process appends (new appends always
    open a new segment). ``max_bytes`` caps the bytes on disk; ``append`` returns what did not fit.
    Not thread-safe: the sinks call it under their lock.
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 8 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.segment_bytes = int(max_bytes), int(segment_bytes)
        self.segments: Deque[int] = deque(sorted(int(p.stem) for p in self.dir.glob(SEGMENT_GLOB) if p.stem.isdigit()))
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

    def points_left(self) -> int:
        """Points in the envelopes not yet popped (reads the spool; for close and ``moxco spool``)."""
        return count_points([self._path(n) for n in self.segments], self._offset)

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


class StoreReplay:
    """Delivers envelopes to a ``moxco.collector.store.Store``: the embedded sink's replay of its
    spool, and ``moxco spool push`` to a database URL. Runs each session opened are recorded in
    ``sessions``."""

    def __init__(self, store: Any, sessions: Sessions, default_run: str) -> None:
        self.store, self.sessions, self.default_run = store, sessions, default_run

    def deliver(self, envelope: Mapping[str, Any]) -> Any:
        """Make the envelope's call on the store; returns what the store returned. A bad envelope
        raises the store's error (``StoreError``: bad input, never retried)."""
        from moxco.wire import parse_points

        kind, body = envelope["kind"], dict(envelope["body"])
        if kind == "open":
            name = body.pop("name")
            opened = self.store.open_run(name, **body)
            if envelope.get("session"):
                self.sessions.record(envelope["session"], opened.run.name)
            return opened
        run = self.sessions.run_of(envelope, self.default_run)
        if kind == "run":
            return self.store.put_run(run, **body)
        if kind == "status":
            return self.store.put_run(run, create=False, **body)
        if kind == "batch":
            acks = [(a["decision_id"], a["applied_step"], a.get("rejected")) for a in body.get("acks") or ()]
            columns = parse_points(body["points"]) if body["points"] else ([], [], [], [], [])
            return self.store.ingest(run, columns, batch_id=body.get("batch_id") or envelope["id"], acks=acks)
        if kind == "ack":
            from moxco.collector.store import NotFoundError

            try:
                return self.store.acknowledge(run, body["decision_id"], body["applied_step"],
                                              rejected=body.get("rejected"))
            except NotFoundError:  # its decision is gone: nothing to hold the rest for
                return None
        raise ValueError(f"unknown spool envelope kind {kind!r}")
