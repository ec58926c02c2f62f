"""Runs: registration (config, optimizer, decision policy), identity, status, listing, the stale-run sweep.

A run has a name (``moxco.wire.check_run_name``), which people type and may reuse, and a stable
``uid`` (a UUID), which never changes. ``open_run`` is an agent's registration: a name already
taken starts a new run with a suffixed name unless the agent resumes. ``put_run`` registers or
updates by name: registering again merges the given config into the stored one and replaces the
optimizer and policy when given. The policy is
``moxco.policy.PolicyConfig.to_dict()`` (NULL: the store takes no policy decisions for the run);
its state (``DecisionPolicy.state_dict()``) is kept with the run and updated under the run's row
lock by ingest.
"""

from __future__ import annotations

import fnmatch
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Tuple

from sqlalchemy import case, func, select, update

from moxco.collector.schema import RUN_LEVEL_RANK, RUN_STATUSES, latest_points, runs, series_blocks
from moxco.collector.store.base import NotFoundError, OpenedRun, RunInfo, StoreError, from_db, run_info
from moxco.policy import DecisionPolicy, PolicyConfig
from moxco.wire import MAX_RUN_NAME, WireError, check_run_name

UNSET: Any = object()  # "leave as stored" for put_run's optimizer and policy
RESUME_MODES = (False, True, "must")


def check_name(name: Any) -> str:
    """``name`` when it is a valid run name (``moxco.wire.check_run_name``), else ``StoreError``."""
    try:
        return check_run_name(name)
    except WireError as exc:
        raise StoreError(str(exc)) from None


def _check_status(status: Optional[str]) -> None:
    if status is not None and status not in RUN_STATUSES:
        raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")


def _check_fields(config: Any, policy: Any) -> Any:
    """Checks a registration's config; returns the policy as ``PolicyConfig.to_dict()`` (or
    ``UNSET``/None as given)."""
    if config is not None and not isinstance(config, Mapping):
        raise StoreError(f"a run's config is a mapping, got {type(config).__name__}")
    if isinstance(policy, PolicyConfig):
        return policy.to_dict()
    if policy is not UNSET and policy is not None:
        return PolicyConfig.from_dict(policy).to_dict()  # ValueError on bad fields
    return policy


def _newer(given: Mapping[str, Any], stored: Optional[Mapping[str, Any]]) -> bool:
    """Whether policy state ``given`` has observed a later probe than ``stored``."""
    if not isinstance(given, Mapping) or given.get("last_step") is None:
        return False
    try:
        DecisionPolicy().load_state_dict({**dict(given), "config": PolicyConfig().to_dict()})
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"not a decision policy state: {exc}") from None
    return stored is None or stored.get("last_step") is None or int(given["last_step"]) > int(stored["last_step"])


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Runs:
    """Run registration and reads (a mixin of ``Store``)."""

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = UNSET,
                policy: Any = UNSET, status: Optional[str] = None, create: bool = True,
                policy_state: Optional[Mapping[str, Any]] = None) -> RunInfo:
        """Register (``create``) or update run ``name``; returns it as ``run`` does.

        ``config`` is merged into the stored config; ``optimizer`` and ``policy`` replace the
        stored ones when given (``policy=None``: the store takes no policy decisions for the run;
        a ``PolicyConfig`` or its dict, ``ValueError`` for bad fields). A changed policy keeps the
        policy's progress (streak, decisions already taken count against ``max_decisions``), so an
        agent registering again after a restart never makes the policy fire again. ``status``
        defaults to ``running`` for a new run and to unchanged for an existing one; ``create=False``
        refuses (``NotFoundError``) a run that does not exist. ``policy_state``: a
        ``DecisionPolicy.state_dict()`` from an agent's checkpoint, stored only when it has seen
        more probes than the stored state (``last_step`` later): a store that lost the run's
        progress gets it back, one that is ahead keeps its own."""
        check_name(name)
        _check_status(status)
        policy = _check_fields(config, policy)
        with self._writer.begin() as conn:
            row = self._locked_row(conn, name)
            if row is None:
                if not create:
                    raise NotFoundError(f"no run named {name!r}")
                if self._insert(conn, name, config, optimizer, policy, status or "running"):
                    if policy_state is not None:
                        self._update(conn, self._locked_row(conn, name), None, UNSET, UNSET, None, policy_state)
                    return self._run(conn, name)
                row = self._locked_row(conn, name)  # another writer registered it meanwhile
            self._update(conn, row, config, optimizer, policy, status, policy_state)
            return self._run(conn, name)

    def open_run(self, name: str, *, resume: Any = False, session: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, optimizer: Any = UNSET,
                 policy: Any = UNSET) -> OpenedRun:
        """Open a run for writing: an agent's registration, with run identity.

        * ``resume=False``: a new run. Named ``name`` when no run has that name, else the first
          free ``name-2``, ``name-3``, … (``OpenedRun.requested`` keeps the name asked for): a
          second job started with the same name never writes into the first one's series.
        * ``resume=True``: run ``name`` continues (status ``running`` again, ``config`` merged,
          ``optimizer`` and ``policy`` as in ``put_run``: the policy keeps its progress), or a new
          run ``name`` when there is none.
        * ``resume="must"``: run ``name`` continues; ``NotFoundError`` when there is none.

        ``session``: the id of the writer opening the run (an agent's session, also the prefix of
        its batch ids), for the one-live-writer check. Returns the ``OpenedRun``."""
        check_name(name)
        if resume not in RESUME_MODES:
            raise StoreError(f"resume must be False, True or 'must', got {resume!r}")
        if session is not None and (not isinstance(session, str) or not 1 <= len(session) <= 100):
            raise StoreError("session must be a string of 1 to 100 characters")
        policy = _check_fields(config, policy)
        with self._writer.begin() as conn:
            for _attempt in range(10):
                row = self._locked_row(conn, name)
                if row is not None and resume:
                    self._update(conn, row, config, optimizer, policy, "running", None)
                    latest, counts = self._series_summary(conn, row["id"])
                    return OpenedRun(self._run(conn, name), created=False, requested=name, latest=latest,
                                     counts=counts)
                if row is None and resume == "must":
                    raise NotFoundError(f"no run named {name!r} to resume (resume='must'): start it with "
                                        "resume=True or without resume")
                target = name if row is None else self._free_name(conn, name)
                if self._insert(conn, target, config, optimizer, policy, "running"):
                    return OpenedRun(self._run(conn, target), created=True, requested=name)
            raise StoreError(f"could not open a run named {name!r}: its names are being taken concurrently")

    def _series_summary(self, conn, run_id: int) -> Tuple[Dict[str, Tuple[int, float]], Dict[str, int]]:
        """``({metric: (newest step, value)}, {metric: points})`` of the run's run-level series."""
        lp, sb = latest_points.c, series_blocks.c
        latest = {m: (int(s), from_db(v)) for m, s, v in conn.execute(
            select(lp.metric, lp.step, lp.value).where(lp.run_id == run_id, lp.rank == RUN_LEVEL_RANK))}
        counts = {m: int(n) for m, n in conn.execute(
            select(sb.metric, func.sum(sb["count"])).where(sb.run_id == run_id, sb.rank == RUN_LEVEL_RANK)
            .group_by(sb.metric))}
        return latest, counts

    def _locked_row(self, conn, name: str):
        return conn.execute(self.sql.for_update(select(runs).where(runs.c.name == name))).mappings().first()

    def _insert(self, conn, name: str, config, optimizer, policy, status: str) -> bool:
        """Insert run ``name`` (a new ``uid``); False when a run of that name exists already."""
        now, uid = time.time(), str(uuid.uuid4())
        conn.execute(self.sql.insert(runs).on_conflict_do_nothing().values(
            name=name, uid=uid, status=status, config=dict(config or {}), created_at=now, updated_at=now,
            last_step=None, optimizer=None if optimizer is UNSET else optimizer,
            policy=None if policy is UNSET else policy, policy_state=None))
        return conn.execute(select(runs.c.uid).where(runs.c.name == name)).scalar() == uid

    def _update(self, conn, row, config, optimizer, policy, status: Optional[str],
                policy_state: Optional[Mapping[str, Any]]) -> None:
        values: Dict[str, Any] = {"updated_at": time.time()}
        if config:
            values["config"] = {**row["config"], **dict(config)}
        if optimizer is not UNSET:
            values["optimizer"] = optimizer
        state = row["policy_state"]
        if policy is not UNSET:
            values["policy"] = policy
            if policy is not None and state is not None and state.get("config") != policy:
                state = values["policy_state"] = {**state, "config": policy}
        if policy_state is not None and _newer(policy_state, state):
            current = policy if policy is not UNSET else row["policy"]
            values["policy_state"] = {**dict(policy_state), **({"config": current} if current else {})}
        if status is not None:
            values["status"] = status
        conn.execute(update(runs).where(runs.c.id == row["id"]).values(**values))

    def _free_name(self, conn, name: str) -> str:
        """The first ``name-N`` (N ≥ 2) no run has, cut to the longest run name."""
        taken = set(conn.execute(select(runs.c.name).where(runs.c.name.like(f"{_like_escape(name[:150])}-%",
                                                                            escape="\\"))).scalars())
        n = 2
        while True:
            suffix = f"-{n}"
            candidate = name[: MAX_RUN_NAME - len(suffix)] + suffix
            if candidate not in taken and conn.execute(select(runs.c.id).where(runs.c.name == candidate)).first() is None:
                return candidate
            n += 1

    def set_status(self, name: str, status: str) -> None:
        """Set run ``name``'s status (``running``, ``finished``, ``interrupted``, ``failed``)."""
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        with self._writer.begin() as conn:
            run_id = self._lock_run(conn, name).id
            conn.execute(update(runs).where(runs.c.id == run_id).values(status=status, updated_at=time.time()))

    def run(self, name: str) -> RunInfo:
        """Run ``name`` with its metric names and phase; ``NotFoundError`` when there is none."""
        with self.engine.connect() as conn:
            return self._run(conn, name)

    def _run(self, conn, name: str) -> RunInfo:
        row = conn.execute(select(runs).where(runs.c.name == name)).mappings().first()
        if row is None:
            raise NotFoundError(f"no run named {name!r}")
        lp = latest_points.c
        names = sorted(conn.execute(select(lp.metric).where(lp.run_id == row["id"]).distinct()).scalars())
        phase = conn.execute(select(lp.value).where(lp.run_id == row["id"], lp.metric == "phase",
                                                    lp.rank == RUN_LEVEL_RANK)).scalar()
        return run_info(row, metrics=names, phase=None if phase is None else int(phase))

    def list_runs(self, *, name: Optional[str] = None, status: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: Optional[int] = 100,
                  offset: int = 0) -> Tuple[int, List[RunInfo]]:
        """Runs newest first, filtered by a case-sensitive glob on the name (``*``, ``?``, ``[…]``),
        status, and activity window (``since``: updated at or after; ``until``: created at or
        before). Returns ``(total matching, the page)``; ``limit=None``: every run from ``offset``."""
        query = select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc())
        if status is not None:
            query = query.where(runs.c.status == status)
        if since is not None:
            query = query.where(runs.c.updated_at >= since)
        if until is not None:
            query = query.where(runs.c.created_at <= until)
        if name is not None and not any(ch in name for ch in "*?["):
            query = query.where(runs.c.name == name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        if name is not None:
            rows = [row for row in rows if fnmatch.fnmatchcase(row["name"], name)]
        end = None if limit is None else offset + limit
        return len(rows), [run_info(row) for row in rows[offset:end]]

    def sweep_stale_runs(self, stale_after: float, *, now: Optional[float] = None) -> Dict[str, List[str]]:
        """Mark ``running`` runs that stored no point and were not updated (registered again,
        status changed) for ``stale_after`` seconds (server clock: ``last_ingest_at``,
        ``updated_at``; never the agents' wall times) ``interrupted``, and
        ``interrupted`` runs that stored points since they were marked (``last_ingest_at`` at or
        after ``updated_at``, within ``stale_after``) ``running`` again. Returns the names per new
        status. Idempotent; the conditions are re-checked in the UPDATEs, so concurrent ingests and
        several collector workers sweeping at once are safe."""
        now = time.time() if now is None else float(now)
        cutoff = now - float(stale_after)
        r = runs.c
        last_heard = case((r.last_ingest_at > r.updated_at, r.last_ingest_at), else_=r.updated_at)
        silent = (r.status == "running") & (last_heard < cutoff)
        revived = (r.status == "interrupted") & (r.last_ingest_at >= cutoff) & (r.last_ingest_at >= r.updated_at)
        out: Dict[str, List[str]] = {"interrupted": [], "running": []}
        with self._writer.begin() as conn:
            for status, where in (("interrupted", silent), ("running", revived)):
                ids = [row.id for row in conn.execute(select(r.id).where(where))]
                if not ids:
                    continue
                conn.execute(update(runs).where(r.id.in_(ids), where).values(status=status, updated_at=now))
                out[status] = sorted(conn.execute(select(r.name).where(r.id.in_(ids), r.status == status)).scalars())
        return out
