"""Runs: registration (config, optimizer, decision policy), identity, who may write them, status,
listing, the stale-run sweep.

A run has a name (``moxco.wire.check_run_name``), which people type and may reuse, and a stable
``uid`` (a UUID), which never changes. ``open_run`` is an agent's registration: a name already
taken starts a new run with a suffixed name unless the agent resumes. ``put_run`` registers or
updates by name: registering again merges the given config into the stored one and replaces the
optimizer and policy when given. The policy is
``moxco.policy.PolicyConfig.to_dict()`` (NULL: the store takes no policy decisions for the run);
its state (``DecisionPolicy.state_dict()``) is kept with the run and updated under the run's row
lock by ingest. The user's ``tags`` and ``note`` label a run for the runs list (``check_tags``,
``check_note``); ``list_runs`` filters by them and by values in the config (``config_filter``).

Who writes a run (``check_writer``, in every write under the run's lock):

* ``token_id``: a caller limited to the runs it registered (an ``ingest`` token) passes its
  token's id; a new run records it as its ``owner``, an existing run owned by another token, or by
  none, is refused (``ForbiddenError``). ``None``: unrestricted (``admin`` tokens, a collector
  without auth, the embedded agent, the CLI).
* ``session``: a writer session id (docs/api.md, One writer per run). A run is held by the last
  session that wrote it while that session is live: the run is ``running`` and was heard from
  (registered or sent points) within ``session_stale_after`` seconds. Another session's write is
  then refused (``BusyError``); a free run is taken by the session that writes it. Writes
  without a session are not checked.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sqlalchemy import and_, case, delete, func, select, true, update

from moxco.collector.schema import (RUN_LEVEL_RANK, RUN_STATUSES, batches, decisions, latest_points, runs,
                                    series_blocks)
from moxco.collector.store.base import (SUMMARY_HYPERPARAMETERS, BusyError, NotFoundError, OpenedRun, RunInfo,
                                        RunSummary, StoreError, TooLargeError, check_owner, from_db, json_value,
                                        run_info)
from moxco.collector.store.globs import glob_condition
from moxco.policy import DecisionPolicy, PolicyConfig
from moxco.wire import (MAX_CONFIG_BYTES, MAX_RUN_NAME, WireError, check_document, check_name_pattern,
                        check_run_name, check_session, check_text)

UNSET: Any = object()  # "leave as stored" for put_run's optimizer, policy, tags and note
MAX_TAGS, MAX_TAG = 32, 64  # tags per run, characters per tag
SESSION_STALE_AFTER_S = 600.0  # a writer session silent this long no longer holds its run
RESUME_MODES = (False, True, "must")


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


def check_doc(value: Any, what: str, max_bytes: Optional[int] = None) -> Any:
    """``moxco.wire.check_document`` as the store's errors (``TooLargeError`` for the size)."""
    try:
        return check_document(value, what, max_bytes=max_bytes)
    except WireError as exc:
        raise (TooLargeError if exc.too_large else StoreError)(str(exc)) from None


def check_policy(policy: Any) -> Optional[Dict[str, Any]]:
    """A run's policy as ``PolicyConfig.to_dict()`` (None stays None); ``StoreError`` for anything
    ``PolicyConfig`` refuses, a value of the wrong type included."""
    if policy is None:
        return None
    if isinstance(policy, PolicyConfig):
        return policy.to_dict()
    if not isinstance(policy, Mapping):
        raise StoreError(f"a run's policy is an object (PolicyConfig.to_dict()), got {type(policy).__name__}")
    check_doc(policy, "the run's policy")
    try:
        return PolicyConfig.from_dict(policy).to_dict()
    except (TypeError, ValueError) as exc:
        raise StoreError(f"invalid policy: {exc}") from None


def _check_fields(config: Any, optimizer: Any, policy: Any, session: Any) -> Any:
    """Checks a registration's config, optimizer and session; returns the policy as
    ``PolicyConfig.to_dict()`` (or ``UNSET``/None as given)."""
    if config is not None:
        if not isinstance(config, Mapping):
            raise StoreError(f"a run's config is a mapping, got {type(config).__name__}")
        check_doc(dict(config), "the run's config", MAX_CONFIG_BYTES)
    if optimizer is not UNSET and optimizer is not None:
        check_doc(optimizer, "the run's optimizer", MAX_CONFIG_BYTES)
    if session is not None:
        _session(session)
    return policy if policy is UNSET else check_policy(policy)


def check_writer(name: str, owner: Optional[int], held_by: Optional[str], status: str, last_heard: Optional[float],
                 token_id: Optional[int], session: Optional[str], stale_after: float, now: float) -> None:
    """Refuse a write to run ``name`` (module docstring): ``ForbiddenError`` when ``token_id`` is
    not the run's ``owner``; ``BusyError`` when ``session`` is not the live session holding it."""
    check_owner(name, owner, token_id)
    if session is not None and held_by is not None and held_by != session and status == "running" \
            and last_heard is not None and now - last_heard < stale_after:
        raise BusyError(f"run {name!r} is being written by another live session ({held_by!r}, last heard "
                        f"{now - last_heard:.0f} s ago): two jobs may not write one run. Use another run name, or "
                        f"wait until the other job finishes or is silent for {stale_after:.0f} s")


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

    session_stale_after: float = SESSION_STALE_AFTER_S

    def put_run(self, name: str, *, config: Optional[Mapping[str, Any]] = None, optimizer: Any = UNSET,
                policy: Any = UNSET, status: Optional[str] = None, create: bool = True,
                token_id: Optional[int] = None, session: Optional[str] = None,
                policy_state: Optional[Mapping[str, Any]] = None, tags: Any = UNSET, note: Any = UNSET) -> RunInfo:
        """Register (``create``) or update run ``name``; returns it as ``run`` does.

        ``config`` is merged into the stored config (at most ``MAX_CONFIG_BYTES`` as JSON once
        merged: ``TooLargeError``); ``optimizer`` and ``policy`` replace the stored ones when given
        (``policy=None``: the store takes no policy decisions for the run; a ``PolicyConfig`` or its
        dict, ``StoreError`` for bad fields). A changed policy keeps the policy's progress (streak,
        decisions already taken count against ``max_decisions``), so an agent registering again
        after a restart never makes the policy fire again. ``status`` defaults to ``running`` for
        a new run and to unchanged for an existing one; ``create=False`` refuses
        (``NotFoundError``) a run that does not exist. ``token_id``, ``session``: who writes
        (module docstring). ``policy_state``: a ``DecisionPolicy.state_dict()`` from an agent's
        checkpoint, stored only when it has seen more probes than the stored state (``last_step``
        later): a store that lost the run's progress gets it back, one that is ahead keeps its own.
        ``tags`` and ``note`` replace the stored ones when given (``check_tags``, ``check_note``;
        ``None`` clears them)."""
        check_name(name)
        labels: Dict[str, Any] = {}
        if tags is not UNSET:
            labels["tags"] = check_tags(tags if tags is not None else [])
        if note is not UNSET:
            labels["note"] = check_note(note)
        _check_status(status)
        policy = _check_fields(config, optimizer, policy, session)
        with self._writer.begin() as conn:
            row = self._locked_row(conn, name)
            if row is None:
                if not create:
                    raise NotFoundError(f"no run named {name!r}")
                if self._insert(conn, name, config, optimizer, policy, status or "running", token_id, session,
                                labels):
                    if policy_state is not None:
                        self._update(conn, self._locked_row(conn, name), None, UNSET, UNSET, None, policy_state, None)
                    return self._run(conn, name)
                row = self._locked_row(conn, name)  # another writer registered it meanwhile
            check_writer(name, row["owner"], row["session"], row["status"], _last_heard(row), token_id, session,
                         self.session_stale_after, time.time())
            self._update(conn, row, config, optimizer, policy, status, policy_state, session, labels)
            return self._run(conn, name)

    def open_run(self, name: str, *, resume: Any = False, session: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, optimizer: Any = UNSET,
                 policy: Any = UNSET, token_id: Optional[int] = None) -> OpenedRun:
        """Open a run for writing: an agent's registration, with run identity.

        * ``resume=False``: a new run. Named ``name`` when no run has that name, else the first
          free ``name-2``, ``name-3``, … (``OpenedRun.requested`` keeps the name asked for): a
          second job started with the same name never writes into the first one's series.
        * ``resume=True``: run ``name`` continues (status ``running`` again, ``config`` merged,
          ``optimizer`` and ``policy`` as in ``put_run``: the policy keeps its progress), or a new
          run ``name`` when there is none.
        * ``resume="must"``: run ``name`` continues; ``NotFoundError`` when there is none.

        ``session``: the id of the writer opening the run (an agent's session, also the prefix of
        its batch ids): it holds the run from now on, a resumed one included (the session that held
        it before, e.g. a job killed without closing, is refused from then on); ``token_id``: as in
        ``put_run`` (a resumed run must be the token's own; a new run is). Returns the ``OpenedRun``."""
        check_name(name)
        if resume not in RESUME_MODES:
            raise StoreError(f"resume must be False, True or 'must', got {resume!r}")
        policy = _check_fields(config, optimizer, policy, session)
        with self._writer.begin() as conn:
            for _attempt in range(10):
                row = self._locked_row(conn, name)
                if row is not None and resume:
                    # resuming takes the run over (a job killed without closing still holds it): the
                    # session that held it is refused from now on (BusyError), so two never mix
                    check_owner(name, row["owner"], token_id)
                    self._update(conn, row, config, optimizer, policy, "running", None, session)
                    latest, counts = self._series_summary(conn, row["id"])
                    return OpenedRun(self._run(conn, name), created=False, requested=name, latest=latest,
                                     counts=counts)
                if row is None and resume == "must":
                    raise NotFoundError(f"no run named {name!r} to resume (resume='must'): start it with "
                                        "resume=True or without resume")
                target = name if row is None else self._free_name(conn, name)
                if self._insert(conn, target, config, optimizer, policy, "running", token_id, session):
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

    def _insert(self, conn, name: str, config, optimizer, policy, status: str, owner: Optional[int] = None,
                session: Optional[str] = None, labels: Optional[Mapping[str, Any]] = None) -> bool:
        """Insert run ``name`` (a new ``uid``); False when a run of that name exists already."""
        now, uid = time.time(), str(uuid.uuid4())
        conn.execute(self.sql.insert(runs).on_conflict_do_nothing().values(
            name=name, uid=uid, status=status, config=dict(config or {}), created_at=now, updated_at=now,
            last_step=None, optimizer=None if optimizer is UNSET else optimizer,
            policy=None if policy is UNSET else policy, policy_state=None, owner=owner, session=session,
            **dict(labels or {})))
        return conn.execute(select(runs.c.uid).where(runs.c.name == name)).scalar() == uid

    def _update(self, conn, row, config, optimizer, policy, status: Optional[str],
                policy_state: Optional[Mapping[str, Any]], session: Optional[str],
                labels: Optional[Mapping[str, Any]] = None) -> None:
        values: Dict[str, Any] = {"updated_at": time.time()}
        if config:
            merged = {**row["config"], **dict(config)}
            check_doc(merged, "the run's config (merged with the stored one)", MAX_CONFIG_BYTES)
            values["config"] = merged
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
        if session is not None:
            values["session"] = session
        values.update(labels or {})
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

    def set_status(self, name: str, status: str, *, token_id: Optional[int] = None) -> None:
        """Set run ``name``'s status (``running``, ``finished``, ``interrupted``, ``failed``)."""
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        with self._writer.begin() as conn:
            row = conn.execute(self.sql.for_update(select(runs.c.id, runs.c.owner).where(runs.c.name == name))).first()
            if row is None:
                raise NotFoundError(f"no run named {name!r}")
            check_owner(name, row.owner, token_id)
            conn.execute(update(runs).where(runs.c.id == row.id).values(status=status, updated_at=time.time()))

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
                  tags: Sequence[str] = (), config: Sequence[Tuple[str, Any]] = ()) -> Tuple[int, List[RunSummary]]:
        """Runs newest first, filtered by a case-sensitive glob on the name (``*``, ``?``, ``[…]``,
        ``[!…]``: ``fnmatch.fnmatchcase``'s syntax), status, and activity window (``since``:
        updated at or after; ``until``: created at or before), ``tags`` (the run has every one) and
        ``config`` (``(dotted path, value)`` pairs, ``config_filter``: the run's config holds every
        one, value and JSON type equal). Returns ``(total matching, the
        page)`` as ``RunSummary`` records (no config: ``run(name)`` has it); ``limit=None``: every
        run from ``offset``. Filtering, counting and paging run in the database, which sends only
        the page's rows."""
        r = runs.c
        where = [true()]
        for tag in tags:
            where.append(self.sql.json_array_has(r.tags, str(tag)))
        for path, value in config:
            where.append(self.sql.json_path_equals(r.config, *config_filter(path, value)))
        if status is not None:
            where.append(r.status == status)
        if since is not None:
            where.append(r.updated_at >= since)
        if until is not None:
            where.append(r.created_at <= until)
        if name is not None:
            try:
                check_name_pattern(name)
            except WireError as exc:
                raise StoreError(str(exc)) from None
            where.append(glob_condition(r.name, name, self.sql.name))
        condition = and_(*where)
        hyper = [r.optimizer[key].label(f"h_{key}") for key in SUMMARY_HYPERPARAMETERS]
        query = (select(r.name, r.status, r.created_at, r.updated_at, r.last_step, r.last_ingest_at, r.policy, r.tags,
                        r.note, *hyper)
                 .where(condition).order_by(r.created_at.desc(), r.id.desc()).offset(offset))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            conn = self.sql.snapshot(conn)  # the count and the page from one snapshot
            total = int(conn.execute(select(func.count()).select_from(runs).where(condition)).scalar())
            rows = conn.execute(query).mappings().all()
        return total, [RunSummary(row["name"], row["status"], row["created_at"], row["updated_at"], row["last_step"],
                                  row["last_ingest_at"], json_value(row["policy"]),
                                  {k: row[f"h_{k}"] for k in SUMMARY_HYPERPARAMETERS if row[f"h_{k}"] is not None},
                                  list(json_value(row["tags"]) or []), row["note"])
                       for row in rows]

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


def _session(session: Any) -> str:
    try:
        return check_session(session)
    except WireError as exc:
        raise StoreError(str(exc)) from None


def _last_heard(row: Mapping[str, Any]) -> Optional[float]:
    heard = [t for t in (row.get("last_ingest_at"), row.get("updated_at")) if t is not None]
    return max(heard) if heard else None
