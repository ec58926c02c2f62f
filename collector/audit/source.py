"""Where an audit reads a run from: one small interface, two implementations.

``RunSource`` is everything the analysis reads of a stored run, and nothing else:

* ``detail(run)``: the run as the query API describes it (``name``, ``status``, ``config``,
  ``optimizer``, ``policy``, ``metrics``);
* ``series(run, metric)``: every run-level point of one metric, ``(steps, values)`` in step order;
* ``decisions(run)``: its decisions as ``moxco.decision.Decision`` objects (who decided, why,
  when it was applied);
* ``run_names()``: the runs there are (for the error that names an unknown run).

``StoreSource`` reads a store directly (``sqlite:///…``, ``postgresql://…``); ``HttpSource``
reads a collector's query API (``GET /api/v1/runs/{run}``, ``/latest``, ``/series/{metric}``
with ``method=none``, ``/decisions``) with a ``read``-scope token. Both give the same
``RunData`` for the same run, so the same report (``tests/audit/test_http_source.py``).
``open_source(url, token)`` picks one by the URL's scheme.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from moxco.decision import Decision, DecisionError
from moxco.wire import WireError, decode_value

#: the most points one ``method=none`` series request may ask for (the API's ``max_points`` limit)
PAGE_POINTS = 100_000


class AuditError(ValueError):
    """Bad input to an audit (unknown run, no store, bad checkpoint data): the message says what."""


def _empty() -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)


@dataclass
class RunData:
    """What the audit reads of one run: its series (``metric -> (steps, values)``), the run's
    record (config, stored optimizer and policy, status) and its decisions. ``RunSource.load``
    builds it; tests build it directly."""

    name: str
    series: Dict[str, Tuple[np.ndarray, np.ndarray]]
    config: Dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    decisions: List[Decision] = field(default_factory=list)
    source: str = ""
    optimizer: Optional[Dict[str, Any]] = None
    policy: Optional[Dict[str, Any]] = None

    def get(self, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        steps, values = self.series.get(metric, _empty())
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def finite(self, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        steps, values = self.get(metric)
        keep = np.isfinite(values)
        return steps[keep], values[keep]

    def has(self, metric: str) -> bool:
        return self.get(metric)[0].size > 0

    def last(self, metric: str) -> float:
        """The newest finite value (NaN when there is none)."""
        _, values = self.finite(metric)
        return float(values[-1]) if values.size else math.nan

    @property
    def errors(self) -> Dict[str, str]:
        """The agent's stored errors (``config["errors"]``: metric group → what failed)."""
        errors = self.config.get("errors") or {}
        return {str(k): str(v) for k, v in errors.items()} if isinstance(errors, Mapping) else {}

    @property
    def optimizer_name(self) -> Optional[str]:
        """The optimizer's class name: the agent's ``config["optimizer"]``, else the stored optimizer's ``class``."""
        name = self.config.get("optimizer")
        if isinstance(name, str) and name:
            return name
        if isinstance(self.optimizer, Mapping) and isinstance(self.optimizer.get("class"), str):
            return self.optimizer["class"]
        return None

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        """The optimizer's hyperparameters as the agent recorded them (``lr``, ``alpha``, ``beta``, …)."""
        stored = self.config.get("hyperparameters")
        if isinstance(stored, Mapping):
            return dict(stored)
        if isinstance(self.optimizer, Mapping):
            return {k: v for k, v in self.optimizer.items() if k != "class"}
        return {}

    @property
    def policy_config(self) -> Optional[Dict[str, Any]]:
        """The run's decision policy: the collector's stored policy (what an operator may change),
        else the one the agent recorded in its config; ``None`` when the run has none."""
        if isinstance(self.policy, Mapping):
            return dict(self.policy)
        stored = self.config.get("policy")
        return dict(stored) if isinstance(stored, Mapping) else None


class RunSource:
    """The reads an audit needs (see the module docstring). Subclasses implement ``detail``,
    ``series``, ``decisions`` and ``run_names``; ``load`` is the same for all."""

    #: where the runs are read from, for the report (a store URL without password, a collector URL)
    label: str = ""

    def detail(self, run: str) -> Dict[str, Any]:
        raise NotImplementedError

    def series(self, run: str, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def decisions(self, run: str) -> List[Decision]:
        raise NotImplementedError

    def run_names(self) -> List[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "RunSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unknown_run(self, run: str) -> AuditError:
        names = self.run_names()
        listing = ", ".join(names[:30]) + (f", … ({len(names)} in all)" if len(names) > 30 else "")
        return AuditError(f"no run named {run!r} in {self.label}; available runs: {listing or 'none'}")

    def load(self, run: str) -> RunData:
        """Everything the audit reads of ``run``; ``AuditError`` naming the available runs when
        there is no such run."""
        info = self.detail(run)
        series = {metric: self.series(run, metric) for metric in sorted(info.get("metrics") or [])}
        return RunData(name=info.get("name", run), series=series, config=dict(info.get("config") or {}),
                       status=str(info.get("status", "unknown")), decisions=self.decisions(run), source=self.label,
                       optimizer=info.get("optimizer"), policy=info.get("policy"))


def _decisions(rows: List[Mapping[str, Any]], run: str) -> List[Decision]:
    out = []
    for row in rows:
        try:
            out.append(Decision.from_json(row))
        except DecisionError as exc:
            raise AuditError(f"run {run!r} has a decision that cannot be read ({exc}): {dict(row)}") from None
    return sorted(out, key=lambda d: (d.step, d.source))


class StoreSource(RunSource):
    """A store opened directly (``moxco.collector.store``)."""

    def __init__(self, store) -> None:
        self.store = store
        self.label = _without_password(str(getattr(store, "url", "")))

    def detail(self, run: str) -> Dict[str, Any]:
        from moxco.collector.store import NotFoundError

        try:
            return self.store.run(run).to_json()
        except NotFoundError:
            raise self.unknown_run(run) from None

    def series(self, run: str, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        return self.store.series(run, metric)

    def decisions(self, run: str) -> List[Decision]:
        return sorted(self.store.decisions(run), key=lambda d: (d.step, d.source))

    def run_names(self) -> List[str]:
        return sorted(r.name for r in self.store.list_runs(limit=None)[1])

    def close(self) -> None:
        self.store.close()


class HttpSource(RunSource):
    """A collector's query API (docs/api.md) with a ``read``-scope token."""

    def __init__(self, url: str, token: Optional[str] = None, *, timeout: float = 60.0) -> None:
        self.base = url.rstrip("/")
        self.label = self.base
        self.token = token
        self.timeout = timeout
        self._latest: Dict[str, Dict[str, Any]] = {}

    def _get(self, path: str, **query: Any) -> Tuple[int, Any]:
        params = {k: v for k, v in query.items() if v is not None}
        url = f"{self.base}/api/v1{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                body = {}
            return exc.code, body
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AuditError(f"cannot reach the collector at {self.base}: {reason}") from None

    def _check(self, status: int, body: Any, what: str) -> Any:
        if status == 200:
            return body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") or f"HTTP {status}"
        if status == 401:
            raise AuditError(f"{self.base} refused the token ({message}): give a read-scope token with --token or "
                             "$MOXCO_TOKEN (moxco token create --name NAME --scope read)")
        if status == 403:
            raise AuditError(f"{self.base}: the token may not read runs ({message}); it needs the read scope")
        raise AuditError(f"{self.base}: {what} failed: {message}")

    @staticmethod
    def _path(run: str) -> str:
        return "/runs/" + urllib.parse.quote(run, safe="")

    def detail(self, run: str) -> Dict[str, Any]:
        status, body = self._get(self._path(run))
        if status == 404:
            raise self.unknown_run(run)
        return self._check(status, body, f"reading run {run!r}")

    def _last_step(self, run: str, metric: str) -> Optional[int]:
        if run not in self._latest:
            status, body = self._get(self._path(run) + "/latest")
            self._latest[run] = self._check(status, body, f"reading the latest points of {run!r}").get("metrics", {})
        point = self._latest[run].get(metric)
        return None if point is None else int(point["step"])

    def series(self, run: str, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        """Every run-level point, read raw (``method=none``) in step ranges of at most
        ``PAGE_POINTS`` points: a range the collector refuses as too large is split in two at the
        middle of its steps (the metric's last step from ``/latest`` bounds the open-ended last
        range, which stays open so that nothing after it is missed)."""
        last = self._last_step(run, metric)
        if last is None:  # no run-level point (only per-rank ones): as the store's default-rank read
            return _empty()
        steps: List[int] = []
        values: List[float] = []
        ranges: List[Tuple[int, Optional[int]]] = [(0, None)]
        while ranges:
            lo, hi = ranges.pop()
            status, body = self._get(self._path(run) + "/series/" + urllib.parse.quote(metric, safe=""),
                                     start_step=lo, end_step=hi, method="none", max_points=PAGE_POINTS)
            top = last if hi is None else hi
            if status == 422 and isinstance(body, dict) and body.get("error", {}).get("code") == "too_many_points" \
                    and top > lo:
                mid = (lo + top) // 2
                ranges += [(mid + 1, hi), (lo, mid)]  # the low range is popped first: pages arrive in step order
                continue
            body = self._check(status, body, f"reading {metric!r} of {run!r}")
            steps.extend(int(s) for s in body["steps"])
            try:
                values.extend(decode_value(v) for v in body["values"])
            except WireError as exc:
                raise AuditError(f"{self.base}: {metric!r} of {run!r} has a value that is not a number: {exc}") from None
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def decisions(self, run: str) -> List[Decision]:
        status, body = self._get(self._path(run) + "/decisions")
        return _decisions(self._check(status, body, f"reading the decisions of {run!r}")["decisions"], run)

    def run_names(self) -> List[str]:
        names: List[str] = []
        offset = 0
        while True:
            status, body = self._get("/runs", limit=1000, offset=offset)
            page = self._check(status, body, "listing runs")
            names += [r["name"] for r in page["runs"]]
            offset += len(page["runs"])
            if not page["runs"] or offset >= page["total"]:
                return sorted(names)


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def default_url() -> str:
    return os.environ.get("MOXCO_URL") or f"sqlite:///{Path.cwd() / 'moxco.db'}"


def open_source(url: Optional[str] = None, token: Optional[str] = None) -> RunSource:
    """``HttpSource`` for an ``http(s)://`` URL (token: ``token``, else ``$MOXCO_TOKEN``), else a
    ``StoreSource`` on the store at ``url`` (default ``$MOXCO_URL``, else ``sqlite:///moxco.db``)."""
    url = url or default_url()
    if url.startswith(("http://", "https://")):
        return HttpSource(url, token if token is not None else os.environ.get("MOXCO_TOKEN"))
    from moxco.collector.store import normalize_url, open_store

    normalized = normalize_url(url)
    if normalized.startswith("sqlite:///") and normalized != "sqlite:///:memory:":
        path = Path(normalized[len("sqlite:///"):])
        if not path.exists():
            raise AuditError(f"no store at {url} (the file {str(path)!r} does not exist)")
    return StoreSource(open_store(normalized))
