"""Runs: registration (config, optimizer, decision policy), status, listing, the stale-run sweep.

A run is registered by name (``moxco.wire.check_run_name``); registering it again merges the
given config into the stored one and replaces the optimizer and policy when given. The policy is
``moxco.policy.PolicyConfig.to_dict()`` (NULL: the store takes no policy decisions for the run);
its state (``DecisionPolicy.state_dict()``) is kept with the run and updated under the run's row
lock by ingest. The user's ``tags`` and ``note`` label a run for the runs list (``check_tags``,
``check_note``); ``list_runs`` filters by them and by values in the config (``config_filter``).
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sqlalchemy import case, delete, func, select, update

from moxco.collector.schema import (RUN_LEVEL_RANK, RUN_STATUSES, batches, decisions, latest_points, runs,
                                    series_blocks)
from moxco.collector.store.base import NotFoundError, RunInfo, StoreError, run_info
from moxco.policy import PolicyConfig
from moxco.wire import WireError, check_run_name, check_text

UNSET: Any = object()  # "leave as stored" for put_run's optimizer, policy, tags and note
MAX_TAGS, MAX_TAG = 32, 64  # tags per run, characters per tag


def check_name(name: Any) -> str:
    """``name`` when it is a valid run name (``moxco.wire.check_run_name``), else ``StoreError``."""
    try:
        return check_run_name(name)
    except WireError as exc:
        raise StoreError(str(exc)) from None


def check_tags(tags: Any) -> List[str]:
    """A run's tags: a list of at most ``MAX_TAGS`` strings of 1–``MAX_TAG`` characters without
    control characters, surrounding spaces removed, duplicates dropped (first kept)."""
    if not isinstance(tags, (list, tuple)) or len(tags) > MAX_TAGS:
        raise StoreError(f"`tags` must be a list of at most {MAX_TAGS} strings")
    out: List[str] = []
    for tag in tags:
        try:
            tag = check_text(tag, "tags").strip()
        except WireError as exc:
            raise StoreError(str(exc)) from None
        if not tag or len(tag) > MAX_TAG or "\n" in tag or "\t" in tag:
            raise StoreError(f"a tag is 1–{MAX_TAG} characters on one line, got {tag!r}")
        if tag not in out:
            out.append(tag)
    return out


def check_note(note: Any) -> Optional[str]:
    """A run's note: text of at most 1,000 characters (``moxco.wire.check_text``); empty or None: no note."""
    if note is None:
        return None
    try:
        return check_text(note, "note") or None
    except WireError as exc:
        raise StoreError(str(exc)) from None


def config_filter(path: str, value: Any) -> Tuple[Tuple[str, ...], Any]:
    """``(keys, value)`` for ``list_runs(config=…)``: ``path`` is a dotted path into the run's config
    (``optimizer``, ``hyperparameters.lr``, ``policy.threshold``); ``value`` a string, number or
    bool, compared with the stored JSON value of the same type."""
    keys = tuple(path.split("."))
    if not path or not all(keys) or any('"' in k or "\\" in k for k in keys) or len(keys) > 8:
        raise StoreError(f"a config filter's key is a dotted path of names (e.g. hyperparameters.lr), got {path!r}")
    if isinstance(value, float) and value != value:
        raise StoreError("a config filter's value cannot be NaN")
    if not isinstance(value, (str, int, float, bool)):
        raise StoreError(f"a config filter's value is a string, number or bool, got {type(value).__name__}")
    return keys, value


def _check_status(status: Optional[str]) -> None:
    if status is not None and status not in RUN_STATUSES:
        raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")


class Runs:
    """Run registration and reads (a mixin of ``Store``)."""

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = UNSET,
                policy: Any = UNSET, status: Optional[str] = None, create: bool = True, tags: Any = UNSET,
                note: Any = UNSET) -> RunInfo:
        """Register (``create``) or update run ``name``; returns it as ``run`` does.

        ``config`` is merged into the stored config; ``optimizer`` and ``policy`` replace the
        stored ones when given (``policy=None``: the store takes no policy decisions for the run;
        a ``PolicyConfig`` or its dict, ``ValueError`` for bad fields). A changed policy keeps the
        policy's progress (streak, decisions already taken count against ``max_decisions``), so an
        agent registering again after a restart never makes the policy fire again. ``status``
        defaults to ``running`` for a new run and to unchanged for an existing one; ``create=False``
        refuses (``NotFoundError``) a run that does not exist. ``tags`` and ``note`` replace the
        stored ones when given (``check_tags``, ``check_note``; ``None`` clears them)."""
        check_name(name)
        labels: Dict[str, Any] = {}
        if tags is not UNSET:
            labels["tags"] = check_tags(tags if tags is not None else [])
        if note is not UNSET:
            labels["note"] = check_note(note)
        _check_status(status)
        if config is not None and not isinstance(config, Mapping):
            raise StoreError(f"a run's config is a mapping, got {type(config).__name__}")
        if isinstance(policy, PolicyConfig):
            policy = policy.to_dict()
        elif policy is not UNSET and policy is not None:
            policy = PolicyConfig.from_dict(policy).to_dict()  # ValueError on bad fields
        now = time.time()
        with self._writer.begin() as conn:
            query = self.sql.for_update(select(runs).where(runs.c.name == name))
            row = conn.execute(query).mappings().first()
            if row is None:
                if not create:
                    raise NotFoundError(f"no run named {name!r}")
                conn.execute(self.sql.insert(runs).on_conflict_do_nothing().values(
                    name=name, status=status or "running", config=dict(config or {}), created_at=now,
                    updated_at=now, last_step=None, optimizer=None if optimizer is UNSET else optimizer,
                    policy=None if policy is UNSET else policy, policy_state=None, **labels))
                row = conn.execute(query).mappings().first()
                if row["created_at"] == now:
                    return self._run(conn, name)
            values: Dict[str, Any] = {"updated_at": now}
            if config:
                values["config"] = {**row["config"], **dict(config)}
            if optimizer is not UNSET:
                values["optimizer"] = optimizer
            if policy is not UNSET:
                values["policy"] = policy
                state = row["policy_state"]
                if policy is not None and state is not None and state.get("config") != policy:
                    values["policy_state"] = {**state, "config": policy}
            if status is not None:
                values["status"] = status
            values.update(labels)
            conn.execute(update(runs).where(runs.c.id == row["id"]).values(**values))
            return self._run(conn, name)

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
                  until: Optional[float] = None, limit: Optional[int] = 100, offset: int = 0,
                  tags: Sequence[str] = (), config: Sequence[Tuple[str, Any]] = ()) -> Tuple[int, List[RunInfo]]:
        """Runs newest first, filtered by a case-sensitive glob on the name (``*``, ``?``, ``[…]``),
        status, activity window (``since``: updated at or after; ``until``: created at or
        before), ``tags`` (the run has every one) and ``config`` (``(dotted path, value)`` pairs,
        ``config_filter``: the run's config holds every one, value and JSON type equal). Returns
        ``(total matching, the page)``; ``limit=None``: every run from ``offset``."""
        query = select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc())
        for tag in tags:
            query = query.where(self.sql.json_array_has(runs.c.tags, str(tag)))
        for path, value in config:
            query = query.where(self.sql.json_path_equals(runs.c.config, *config_filter(path, value)))
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

    def delete_run(self, name: str) -> Dict[str, int]:
        """Delete run ``name`` and everything stored for it (points, block summaries, latest values,
        decisions, batch ids) in one transaction under the run's lock; returns what was deleted
        (``points``, ``decisions``). ``NotFoundError`` when there is no such run. A writer still
        sending to the name afterwards gets ``NotFoundError`` until it registers the run again."""
        with self._writer.begin() as conn:
            run_id = self._lock_run(conn, name).id
            points = conn.execute(select(func.coalesce(func.sum(series_blocks.c["count"]), 0))
                                  .where(series_blocks.c.run_id == run_id)).scalar()
            gone = conn.execute(delete(decisions).where(decisions.c.run_id == run_id)).rowcount
            self.sql.delete_points(conn, run_id)
            for table in (series_blocks, latest_points, batches):
                conn.execute(delete(table).where(table.c.run_id == run_id))
            conn.execute(delete(runs).where(runs.c.id == run_id))
        return {"points": int(points), "decisions": int(gone)}

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
