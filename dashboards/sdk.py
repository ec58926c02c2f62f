"""Small typed pieces the Grafana Foundation SDK does not ship, in its own builder style.

The SDK (``grafana-foundation-sdk``) has typed builders for dashboards, panels and Prometheus
queries, but none for the SQL datasources (PostgreSQL) and its annotation model only carries the
fields every datasource shares. These classes fill the gap without leaving the SDK's model: they
implement its ``Dataquery`` variant and ``Builder`` interfaces, so panels and dashboards take them
like any SDK query, and the SDK's ``JSONEncoder`` serialises them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard as dm

__all__ = ["SQLQuery", "SQLQueryBuilder", "ExtendedAnnotation", "AnnotationBuilder"]


class SQLQuery(cogvariants.Dataquery):
    """A raw-SQL query of Grafana's SQL datasources (PostgreSQL, MySQL): the JSON Grafana ≥ 10
    stores for a query written in the code editor."""

    def __init__(self) -> None:
        self.ref_id: str = ""
        self.raw_sql: str = ""
        self.format: str = "time_series"
        self.datasource: Optional[dm.DataSourceRef] = None
        self.hide: Optional[bool] = None

    def to_json(self) -> Dict[str, object]:
        payload: Dict[str, object] = {"refId": self.ref_id}
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        payload.update({"editorMode": "code", "format": self.format, "rawQuery": True, "rawSql": self.raw_sql})
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload


class SQLQueryBuilder(cogbuilder.Builder[SQLQuery]):
    """Builder of :class:`SQLQuery` (``format`` is ``time_series`` or ``table``)."""

    def __init__(self) -> None:
        self._internal = SQLQuery()

    def build(self) -> SQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> "SQLQueryBuilder":
        self._internal.ref_id = ref_id
        return self

    def raw_sql(self, sql: str) -> "SQLQueryBuilder":
        self._internal.raw_sql = sql
        return self

    def format(self, format_val: str) -> "SQLQueryBuilder":
        if format_val not in ("time_series", "table"):
            raise ValueError(f"SQL query format must be time_series or table, not {format_val!r}")
        self._internal.format = format_val
        return self

    def datasource(self, datasource: dm.DataSourceRef) -> "SQLQueryBuilder":
        self._internal.datasource = datasource
        return self


class ExtendedAnnotation(dm.AnnotationQuery):
    """An SDK annotation query plus the datasource-specific keys Grafana reads beside the common
    ones (Prometheus: ``titleFormat``, ``textFormat``, ``tagKeys``, ``step``; SQL: ``target`` as a
    full query)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra: Dict[str, Any] = {}

    def to_json(self) -> Dict[str, object]:
        payload = super().to_json()
        payload.update(self.extra)
        return payload


class AnnotationBuilder(cogbuilder.Builder[dm.AnnotationQuery]):
    """Builder of :class:`ExtendedAnnotation`, with the SDK ``AnnotationQuery`` builder's names."""

    def __init__(self, name: str) -> None:
        self._internal = ExtendedAnnotation()
        self._internal.name = name
        self._internal.enable = True
        self._internal.hide = False

    def build(self) -> dm.AnnotationQuery:
        return self._internal

    def datasource(self, datasource: dm.DataSourceRef) -> "AnnotationBuilder":
        self._internal.datasource = datasource
        return self

    def icon_color(self, color: str) -> "AnnotationBuilder":
        self._internal.icon_color = color
        return self

    def enable(self, enable: bool) -> "AnnotationBuilder":
        self._internal.enable = enable
        return self

    def expr(self, expr: str) -> "AnnotationBuilder":
        self._internal.expr = expr
        return self

    def sql_target(self, query: SQLQueryBuilder) -> "AnnotationBuilder":
        """The annotation's query for a SQL datasource (``time``, ``text``, ``tags`` columns)."""
        self._internal.extra["target"] = query.build()
        return self

    def extra(self, **fields: Any) -> "AnnotationBuilder":
        """Datasource-specific keys, in Grafana's camelCase spelling."""
        self._internal.extra.update(fields)
        return self
