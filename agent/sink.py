"""The embedded sink: the agent's ``Sink`` on a ``Store`` in this process (``attach(url="sqlite:…")``).

It makes the store's own calls (``put_run``, ``ingest``, ``set_status``, ``decisions``), on the
writer thread, so the same store code registers the run with its decision policy and decides on
the goodness points of each batch, as the collector does for an agent over HTTP. The decisions an
ingest answers as pending (the policy's, an operator's) are handed to ``on_decision(ident,
Decision)``, each id once; then the goodness probes of the batch are reported to ``on_answer(steps)``
(the store has run the policy on them: an agent waiting for the answer to a probe goes on).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from moxco.decision import Decision
from moxco.policy import probe_steps

log = logging.getLogger("moxco.agent")


class EmbeddedSink:
    """``Sink`` over ``store`` (closed with the sink when ``owns_store``)."""

    def __init__(self, store: Any, *, on_decision: Optional[Callable[[str, Decision], None]] = None,
                 on_answer: Optional[Callable[[List[int]], None]] = None, owns_store: bool = True) -> None:
        self.store = store
        self.on_decision = on_decision
        self.on_answer = on_answer
        self.owns_store = owns_store
        self._seen: set[str] = set()  # decision ids already handed to the agent

    def put_run(self, name: str, **fields: Any) -> Any:
        """``Store.put_run``: register or update the run (config merged; optimizer, policy, status)."""
        return self.store.put_run(name, **fields)

    def ingest(self, name: str, points: Iterable[Any], *, acks: Sequence[Tuple] = ()) -> Any:
        """``Store.ingest`` of the points and acknowledgements; hands the pending decisions over.
        Returns the ``IngestResult``."""
        points = points if isinstance(points, (list, tuple)) else list(points)
        result = self.store.ingest(name, points, acks=acks)
        self._hand_over(result.pending)
        probes = probe_steps(points) if self.on_answer is not None else ()
        if probes:
            try:
                self.on_answer(probes)
            except Exception as exc:  # noqa: BLE001 - as the decision callback
                log.warning("moxco: the answer callback failed for probes %s: %s", probes, exc)
        return result

    def set_status(self, name: str, status: str) -> None:
        self.store.set_status(name, status)

    def decisions(self, name: str) -> List[Decision]:
        """Every decision of the run, with its acknowledgement."""
        return self.store.decisions(name)

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
        if self.owns_store:
            self.store.close()

    def __repr__(self) -> str:
        return f"EmbeddedSink({getattr(self.store, 'url', self.store)!r})"
