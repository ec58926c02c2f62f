"""The dashboards' SQL on the moxco store (PostgreSQL, collector/schema.py), in one place.

* ``RUNS_SQL``: the ``run`` variable: every run of the store, newest first (finished runs too).
* ``THRESHOLD_SQL``: the ``C`` variable: the goodness threshold of the selected run's stored
  decision policy (the collector's policy, else the one the embedded agent recorded in the
  config); ``NaN`` when the run has none, so ``vector($C)`` draws nothing rather than a made-up line.
* ``by_step_sql``: a catalogue panel's metrics by step, one column per metric, for Grafana's trend
  panel. A series of at most ``FULL_RESOLUTION`` points is read whole (its chunks unnested); a longer
  one from its block summaries (``series_blocks``: per block of 1,024 steps its first, minimum,
  maximum and last point, and its first NaN), ~4 rows per block whatever the run's length, every
  spike kept. NaN is NULL (a gap).
* ``user_series_sql``: every other series of the run (the user's own, ``agent.log``) the same way,
  long (``step, metric, Value``), for one panel with a line per metric.
* the decisions (annotations and table) and the runs summary of the compare dashboard.

Every query quotes the run through Grafana's ``${run:sqlstring}`` (safe for any run name) and is run
on a real PostgreSQL by tests/dashboards/test_sql_on_store.py.
"""

from __future__ import annotations

from typing import Sequence, Tuple

FULL_RESOLUTION = 2000  # points per series read whole; beyond, block summaries


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(label: str) -> str:
    return '"' + label.replace('"', '""') + '"'


RUNS_SQL = "SELECT name FROM runs ORDER BY created_at DESC, id DESC"

_THRESHOLD = ("CAST(COALESCE(r.policy ->> 'threshold', r.config -> 'policy' ->> 'threshold') AS DOUBLE PRECISION)")

THRESHOLD_SQL = f"""
    SELECT COALESCE(CAST((SELECT {_THRESHOLD} FROM runs r WHERE r.name = ${{run:sqlstring}}) AS TEXT), 'NaN')"""


def _points_by_step(where: str, narrow: bool = True) -> str:
    """``run``, ``total`` and ``x``: the selected run's run-level points of the metrics ``where``
    (a condition on ``metric``) by step, ``x(metric, step, value)``: a series of at most
    ``FULL_RESOLUTION`` points whole, a longer one as its blocks' first, lowest, highest and last
    point and first NaN; NaN is NULL. ``total`` holds only the metrics ``where`` keeps, so ``x``
    (joined on it) does too; ``narrow`` repeats the condition where the points are read (an
    ``IN`` list lets the index skip the other metrics' rows, a ``NOT IN`` would not)."""
    again = f" AND {{}}.{where}" if narrow else ""
    return f"""
        WITH run AS (SELECT id FROM runs WHERE name = ${{run:sqlstring}}),
        total AS (
          SELECT b.metric, sum(b.count) AS n FROM series_blocks b JOIN run ON b.run_id = run.id
          WHERE b.rank = -1 AND b.{where} GROUP BY b.metric),
        x AS (
          SELECT c.metric, u.step, NULLIF(u.value, 'NaN'::float8) AS value
          FROM point_chunks c JOIN run ON c.run_id = run.id JOIN total t ON t.metric = c.metric AND t.n <= {FULL_RESOLUTION}
          CROSS JOIN LATERAL unnest(c.steps, c.vals) AS u(step, value)
          WHERE c.rank = -1{again.format("c")}
          UNION
          SELECT b.metric, u.step, u.value
          FROM series_blocks b JOIN run ON b.run_id = run.id JOIN total t ON t.metric = b.metric AND t.n > {FULL_RESOLUTION}
          CROSS JOIN LATERAL (VALUES (b.first_step, b.first_value), (b.min_step, b.min_value),
                                     (b.max_step, b.max_value), (b.last_step, b.last_value),
                                     (b.nan_step, NULL::float8)) AS u(step, value)
          WHERE b.rank = -1{again.format("b")} AND u.step IS NOT NULL)"""


def by_step_sql(columns: Sequence[Tuple[str, str]], threshold: bool = False) -> str:
    """The run's ``(metric, label)`` series by step as one table: ``step``, then one column per
    label (NULL where that metric has no point at the step, or a NaN); with ``threshold``, a ``C``
    column holding the run's stored goodness threshold on every row."""
    names = ", ".join(_quote(metric) for metric, _label in columns)
    pivot = ", ".join(f"max(x.value) FILTER (WHERE x.metric = {_quote(metric)}) AS {_ident(label)}"
                      for metric, label in columns)
    extra = f", (SELECT {_THRESHOLD} FROM runs r WHERE r.name = ${{run:sqlstring}}) AS \"C\"" if threshold else ""
    return _points_by_step(f"metric IN ({names})") + f"""
        SELECT x.step AS "step", {pivot}{extra}
        FROM x GROUP BY x.step ORDER BY x.step"""


def user_series_sql(known: Sequence[str]) -> str:
    """Every run-level series of the run whose name is not in ``known`` (the catalogue's: what
    remains is what the user logged with ``agent.log``), long: ``step``, ``metric``, ``Value``, by
    metric then step, as ``by_step_sql`` reads them (block summaries past ``FULL_RESOLUTION``). The
    panel splits it into one line per metric (``Value`` is what Grafana names after the metric)."""
    names = ", ".join(_quote(metric) for metric in known)
    return _points_by_step(f"metric NOT IN ({names})", narrow=False) + """
        SELECT x.step AS "step", x.metric AS "metric", x.value AS "Value"
        FROM x ORDER BY x.metric, x.step"""


DECISIONS_ANNOTATION_SQL = """
    SELECT to_timestamp(d.created_at) AS "time",
           'decision (' || d.source || ') at step ' || d.step || ': ' || CAST(d.action AS TEXT)
           || ', goodness ' || COALESCE(CAST(ROUND(CAST(d.goodness AS NUMERIC), 3) AS TEXT), 'n/a')
           || COALESCE(', applied at step ' || d.applied_step, ', not applied yet') AS "text",
           r.name AS "tags"
    FROM decisions d JOIN runs r ON r.id = d.run_id
    WHERE r.name IN (${run:sqlstring}) AND $__unixEpochFilter(d.created_at)
    ORDER BY 1"""

DECISIONS_TABLE_SQL = """
    SELECT to_timestamp(d.created_at) AS "time", d.step AS "step", d.source AS "source",
           d.goodness AS "goodness", d.grad_term AS "grad term", d.sharpness_term AS "sharpness term",
           d.loss_term AS "loss term", CAST(d.action AS TEXT) AS "action",
           d.applied_step AS "applied at step"
    FROM decisions d JOIN runs r ON r.id = d.run_id
    WHERE r.name = ${run:sqlstring}
    ORDER BY d.step"""


def _latest(metric: str) -> str:
    # latest_points: one key lookup (the points themselves are chunks behind a view on PostgreSQL)
    return (f"(SELECT lp.value FROM latest_points lp WHERE lp.run_id = r.id AND lp.metric = '{metric}' "
            f"AND lp.rank = -1)")


def _extreme(fn: str, metric: str) -> str:
    # series_blocks keeps each block's min and max (NaN skipped): ~1,000 rows for 1 M points
    column = {"min": "min_value", "max": "max_value"}[fn]
    return (f"(SELECT {fn}(b.{column}) FROM series_blocks b WHERE b.run_id = r.id AND b.metric = '{metric}' "
            f"AND b.rank = -1)")


RUNS_SUMMARY_SQL = f"""
    SELECT r.name AS "run", r.status AS "status", r.last_step AS "last step",
           {_latest('phase')} AS "phase",
           {_latest('loss')} AS "last loss", {_extreme('min', 'loss')} AS "min loss",
           {_latest('goodness')} AS "last goodness", {_THRESHOLD} AS "threshold C",
           {_extreme('max', 'sharpness')} AS "max sharpness",
           {_latest('convexity_ratio')} AS "convexity ratio",
           (SELECT count(*) FROM decisions d WHERE d.run_id = r.id) AS "decisions"
    FROM runs r
    WHERE r.name IN (${{run:sqlstring}})
    ORDER BY r.name"""
