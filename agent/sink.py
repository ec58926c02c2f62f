"""The embedded sink: the agent's ``Sink`` on a ``Store`` in this process (``attach(url="sqlite:…")``).

It makes the store's own calls (``put_run``, ``ingest``, ``set_status``, ``decisions``), on the
writer thread, so the same store code registers the run with its decision policy and decides on
the goodness points of each batch, as the collector does for an agent over HTTP. The decisions an
ingest answers as pending (the policy's, an operator's) are handed to ``on_decision(ident,
Decision)``, each id once; then the goodness probes of the batch are reported to ``on_answer(steps)``
(the store has run the policy on them: an agent waiting for the answer to a probe goes on).

Store trouble never reaches the training job as a crash, and never goes unsaid:

* ``EmbeddedSink.open(url, run)``: a store that cannot be opened (a read-only working directory,
  a missing folder) is replaced by one in the agent's spool folder (``$MOXCO_SPOOL/<run>/moxco.db``,
  as the HTTP mode's spool), with one warning naming both; when neither opens, the registration is
  kept and every ``ingest`` fails with what happened (the writer keeps its points, bounded, and
  records the error once) while the first store is tried again every ``RETRY_OPEN_S``.
* A store file deleted or replaced under the job (``StoreLostError``), or a run that vanished from
  it (``NotFoundError``), is noticed at the next write: the store is opened again (a new file), the
  run registered again with everything registered so far, and that ``ingest`` fails once with a
  message that says what was lost, so the agent records it (``agent.errors["store"]``) and warns
  once; its points stay with the writer and go to the new file with the next write.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from moxco.decision import Decision
from moxco.policy import probe_steps

log = logging.getLogger("moxco.agent")

RETRY_OPEN_S = 30.0


class EmbeddedSink:
    """``Sink`` over ``store`` (closed with the sink when ``owns_store``); ``url``: where to open
    it again (``store.url`` by default)."""

    def __init__(self, store: Any, *, on_decision: Optional[Callable[[str, Decision], None]] = None,
                 on_answer: Optional[Callable[[List[int]], None]] = None, owns_store: bool = True,
                 url: Optional[str] = None, problem: Optional[str] = None) -> None:
        self.store = store
        self.on_decision = on_decision
        self.on_answer = on_answer
        self.owns_store = owns_store
        self.url = url or getattr(store, "url", None)
        self._problem = problem  # why there is no store (store is None)
        self._next_open = time.monotonic() + RETRY_OPEN_S
        self._seen: set[str] = set()  # decision ids already handed to the agent
        self._registrations: Dict[str, Dict[str, Any]] = {}  # per run: everything put_run was given

    @classmethod
    def open(cls, url: str, run: str, *, on_decision: Optional[Callable[[str, Decision], None]] = None,
             on_answer: Optional[Callable[[List[int]], None]] = None) -> "EmbeddedSink":
        """The sink on the store at ``url``; a store that cannot be opened there is opened in the
        agent's spool folder instead, or later (module docstring). Never raises for store trouble."""
        from moxco.agent.transport import default_spool_dir
        from moxco.collector.store import open_store

        try:
            return cls(open_store(url), on_decision=on_decision, on_answer=on_answer, url=url)
        except Exception as exc:  # noqa: BLE001 - any store trouble: attach must not raise into the job
            first = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        fallback = Path(default_spool_dir(run)) / "moxco.db"
        try:
            store = open_store(str(fallback))
        except Exception as exc:  # noqa: BLE001
            problem = (f"moxco could not open the store {url} ({first}) nor {fallback} ({type(exc).__name__}: "
                       f"{exc}); points are kept in memory (bounded) and written once {url} opens")
            log.error("moxco: run %r: %s", run, problem)
            return cls(None, on_decision=on_decision, on_answer=on_answer, url=url, problem=problem)
        log.warning("moxco: run %r: could not open the store %s (%s); writing to %s instead", run, url, first, fallback)
        return cls(store, on_decision=on_decision, on_answer=on_answer, url=str(fallback))

    def put_run(self, name: str, **fields: Any) -> Any:
        """``Store.put_run``: register or update the run (config merged; optimizer, policy, status)."""
        kept = self._registrations.setdefault(name, {})
        for key, value in fields.items():
            if key == "config" and value is not None:
                kept["config"] = {**kept.get("config", {}), **dict(value)}
            elif key in ("optimizer", "policy") or (key == "status" and value is not None):
                kept[key] = value
        store = self._store()
        if store is None:
            return None  # applied when the store opens (_store)
        return self._guarded(name, lambda: store.put_run(name, **fields))

    def ingest(self, name: str, points: Iterable[Any], *, acks: Sequence[Tuple] = ()) -> Any:
        """``Store.ingest`` of the points and acknowledgements; hands the pending decisions over.
        Returns the ``IngestResult``."""
        from moxco.collector.store import StoreError

        points = points if isinstance(points, (list, tuple)) else list(points)
        store = self._store()
        if store is None:
            raise StoreError(self._problem or "no store")
        result = self._guarded(name, lambda: store.ingest(name, points, acks=acks))
        self._hand_over(result.pending)
        probes = probe_steps(points) if self.on_answer is not None else ()
        if probes:
            try:
                self.on_answer(probes)
            except Exception as exc:  # noqa: BLE001 - as the decision callback
                log.warning("moxco: the answer callback failed for probes %s: %s", probes, exc)
        return result

    def set_status(self, name: str, status: str) -> None:
        self._registrations.setdefault(name, {})["status"] = status
        store = self._store()
        if store is not None:
            self._guarded(name, lambda: store.set_status(name, status))

    def decisions(self, name: str) -> List[Decision]:
        """Every decision of the run, with its acknowledgement."""
        store = self._store()
        return store.decisions(name) if store is not None else []

    def _store(self) -> Any:
        """The store; one that could not be opened is tried again every ``RETRY_OPEN_S`` (and, once
        open, given the registrations made meanwhile)."""
        if self.store is not None or self.url is None or time.monotonic() < self._next_open:
            return self.store
        self._next_open = time.monotonic() + RETRY_OPEN_S
        from moxco.collector.store import open_store

        try:
            store = open_store(self.url)
            for name, fields in self._registrations.items():
                store.put_run(name, **fields)
        except Exception as exc:  # noqa: BLE001 - still unavailable: the next try is later
            self._problem = f"{self._problem or ''} (last try: {type(exc).__name__})".strip()
            return None
        log.warning("moxco: the store %s opened; writing there", self.url)
        self.store, self.owns_store, self._problem = store, True, None
        return store

    def _guarded(self, name: str, call: Callable[[], Any]) -> Any:
        """``call()``, a write of run ``name``; a lost store file or run is recovered (``_recover``)
        and said as the error raised."""
        from moxco.collector.store import NotFoundError, StoreLostError

        try:
            return call()
        except (StoreLostError, NotFoundError) as exc:
            raise self._recover(name, exc) from None

    def _recover(self, name: str, exc: Exception) -> Exception:
        """After ``StoreLostError`` (the file went) or ``NotFoundError`` (the run went): open the
        store again, register the run again; returns the error the writer records."""
        from moxco.collector.store import StoreError, StoreLostError, open_store

        fields = self._registrations.get(name, {})
        try:
            if isinstance(exc, StoreLostError):
                store = open_store(self.url)
                old, self.store, owned = self.store, store, self.owns_store
                self.owns_store = True
                if owned:
                    try:
                        old.close()
                    except Exception:  # noqa: BLE001 - the old file is gone anyway
                        pass
            self.store.put_run(name, **fields)
        except Exception as again:  # noqa: BLE001 - the writer keeps its points and tries later
            return StoreError(f"{exc}; opening it again failed too ({type(again).__name__}: {again})")
        lost = ("the store file was deleted or replaced" if isinstance(exc, StoreLostError)
                else f"run {name!r} vanished from the store")
        return StoreError(f"{lost} while this job was writing to it: the points written before are lost ({exc}). "
                          f"The run is registered again in {self.url} and the points from now on are kept there")

    def _hand_over(self, pending: List[Decision]) -> None:
        if self.on_decision is None:
            return
        for decision in pending:
            if decision.id in self._seen:
                continue
            self._seen.add(decision.id)
            try:
                self.on_decision(decision.id, decision)
            except Exception as exc:  # noqa: BLE001 - the agent's callback must not fail the write
                log.warning("moxco: the decision callback failed for %s: %s", decision.id, exc)

    def close(self) -> None:
        if self.owns_store and self.store is not None:
            self.store.close()

    def __repr__(self) -> str:
        return f"EmbeddedSink({self.url!r})"
