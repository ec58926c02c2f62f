"""The Prometheus exposition (``/metrics``): run gauges read from the store, collector health.

Run gauges are built at scrape time from ``latest_points`` (one row per series, maintained on
ingest) of the *running* runs, so finished runs drop out, and every uvicorn worker answers the
same thing whichever one Prometheus reaches (the data lives in the database, not in a worker).
The series are bounded per run: every catalogue metric, and of the run's other names the first
``metrics_per_run`` (default 200) by name; names left out (over that bound, or not valid as
Prometheus names) are still stored and served by the API, and counted in
``moxco_run_metrics_left_out{run}``. Names are exposed only when they match ``[a-z_][a-z0-9_]*``
as a whole string, so nothing a client sends can break the text format. The result is cached ``cache_s`` (1 s) per
process so a burst of scrapes costs one set of queries.

Collector health (counters, the request-duration histogram) lives in each worker's memory; with
several workers ``moxco serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` and prometheus_client's
multiprocess mode sums the workers' files at scrape time. ``moxco_collector_store_up`` and
``moxco_collector_running_runs`` are computed at scrape time like the run gauges.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from typing import Iterable, List, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from moxco import catalogue
from moxco.collector.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-z_][a-z0-9_]*")  # whole-string (fullmatch): a Prometheus name moxco_<metric>
# families the exposition defines itself: a stored metric with one of these names is not re-exported
_RESERVED = {"run_step", "run_last_ingest_timestamp_seconds", "run_metrics_left_out", "decisions", "decisions_total",
             "sharpness_target"}

disable_created_metrics()  # no *_created series: they double the exposition for nothing we use

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DEFAULT_METRICS_PER_RUN = 200  # exposed series per run beyond the catalogue's
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def method_label(method: str) -> str:
    """The ``method`` label of the request histogram: the HTTP methods the API knows, every other
    token a client may send as ``other`` (one series, not one per method invented)."""
    return method if method in HTTP_METHODS else "other"


class HealthMetrics:
    """The collector's own counters and histogram (multiprocess-safe when the env var is set)."""

    def __init__(self, registry: Optional[CollectorRegistry]) -> None:
        kw = {"registry": registry}
        self.points = Counter("moxco_collector_ingest_points", "Metric points newly stored by ingest.", **kw)
        self.batches = Counter("moxco_collector_ingest_batches", "Ingested batches by outcome.", ["outcome"], **kw)
        self.requests = Histogram("moxco_collector_request_duration_seconds", "HTTP request duration.",
                                  ["method", "route", "status"], buckets=LATENCY_BUCKETS, **kw)
        self.errors = Counter("moxco_collector_errors", "Requests answered with an error, by kind.", ["kind"], **kw)
        for outcome in ("stored", "duplicate", "rejected"):
            self.batches.labels(outcome)


def multiprocess_dir() -> Optional[str]:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")



class RunCollector(Collector):
    """Yields the run gauges and the store-derived health gauges from one ``running_latest`` read."""

    def __init__(self, store: Store, cache_s: float = 1.0, metrics_per_run: int = DEFAULT_METRICS_PER_RUN) -> None:
        self.store = store
        self.cache_s = cache_s
        self.metrics_per_run = int(metrics_per_run)
        self._lock = threading.Lock()
        self._cached: Optional[tuple] = None

    def _snapshot(self):
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self.cache_s:
                return self._cached[1]
        try:
            runs, up = self.store.running_latest(metric_limit=self.metrics_per_run, always=catalogue.names()), True
        except Exception:  # noqa: BLE001 - the store being down is what store_up reports
            runs, up = [], False
        with self._lock:
            self._cached = (now, (runs, up))
        return runs, up

    def collect(self) -> Iterable:
        runs, up = self._snapshot()
        yield GaugeMetricFamily("moxco_collector_store_up", "1 when the store answered the last scrape's query.",
                                value=1.0 if up else 0.0)
        yield GaugeMetricFamily("moxco_collector_running_runs", "Runs with status running.", value=float(len(runs)))
        families = {}
        step = GaugeMetricFamily("moxco_run_step", "Last step stored for the run.", labels=["run"])
        ingest = GaugeMetricFamily("moxco_run_last_ingest_timestamp_seconds",
                                   "Wall time of the run's last ingested batch.", labels=["run"])
        target = GaugeMetricFamily("moxco_sharpness_target", "λ_target the goodness score uses, when known.",
                                   labels=["run"])
        decided = CounterMetricFamily("moxco_decisions", "Phase-switch decisions stored for the run.", labels=["run"])
        left_out = GaugeMetricFamily("moxco_run_metrics_left_out",
                                     f"Run-level series of the run not exposed here: over the bound of "
                                     f"{self.metrics_per_run} names beyond the catalogue's, or not valid Prometheus "
                                     "names (still stored; the API serves them).", labels=["run"])
        for run in runs:
            name = run["name"]
            if run["last_step"] is not None:
                step.add_metric([name], float(run["last_step"]))
            if run["last_ingest_at"] is not None:
                ingest.add_metric([name], float(run["last_ingest_at"]))
            decided.add_metric([name], float(run["decisions"]))
            skipped = int(run.get("left_out", 0))
            for metric, value in sorted(run["metrics"].items()):
                if metric == "sharpness_target":
                    target.add_metric([name], value)
                    continue
                if not _NAME.fullmatch(metric) or metric in _RESERVED or metric.startswith(("collector_", "run_")):
                    skipped += 1  # not a valid Prometheus name, or would collide with our own families
                    continue
                family = families.get(metric)
                if family is None:
                    family = families[metric] = GaugeMetricFamily(
                        f"moxco_{metric}", catalogue.help_text(metric), labels=["run"])
                family.add_metric([name], value)
            left_out.add_metric([name], float(skipped))
        yield step
        yield ingest
        yield target
        yield decided
        yield left_out
        yield from families.values()


class Exposition:
    """Builds the ``/metrics`` body: health (this process or all workers' files) plus run gauges."""

    def __init__(self, store: Store, *, cache_s: float = 1.0, metrics_per_run: int = DEFAULT_METRICS_PER_RUN) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.health_registry = None if self.multiprocess else CollectorRegistry()
        self.health = HealthMetrics(self.health_registry)
        self.runs = RunCollector(store, cache_s, metrics_per_run)

    def render(self) -> bytes:
        registry = CollectorRegistry()
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)
            body = generate_latest(registry)
        else:
            body = generate_latest(self.health_registry)
        runs_registry = CollectorRegistry()
        runs_registry.register(self.runs)
        return body + generate_latest(runs_registry)


def format_value(value: float) -> str:
    """How the exposition writes a value (``NaN``, ``+Inf``, ``-Inf`` for non-finite ones)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


__all__: List[str] = ["CONTENT_TYPE", "DEFAULT_METRICS_PER_RUN", "Exposition", "HealthMetrics", "RunCollector",
                      "format_value", "method_label"]
