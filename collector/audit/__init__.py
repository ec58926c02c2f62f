"""moxco.collector.audit: post-hoc assumption audits of stored runs (``moxco audit``, docs/audit.md).

* ``source``: where a run is read from (``RunSource``: a store, or a collector's query API);
* ``analysis``: the numbers and verdicts, one module per assumption of the audit paper
  (``convexity``, ``smoothness``, ``descent``) and MoXCo (``moxco_section``), with ``stats``,
  ``verdicts`` and ``conventions``;
* ``report``, ``compare``, ``plots``: self-contained HTML reports (inline SVG plots) and JSON
  summaries, single runs and side-by-side comparisons;
* ``checkpoints``: checkpoint mode, the global metrics computed after the fact from saved weights;
* ``cli``: the ``moxco audit`` command.

Importing this package loads nothing heavy (``moxco --help`` registers ``cli`` through it): the
analysis (NumPy, ``moxco.metrics``) is resolved on first use, Matplotlib and
tqdm when a report is drawn or checkpoints are evaluated.
"""

import importlib
from typing import Any

__all__ = ["AuditError", "HttpSource", "RunAudit", "RunData", "RunSource", "Section", "StoreSource", "audit",
           "open_source"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'moxco.collector.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module("moxco.collector.audit.analysis"), name)
    globals()[name] = value
    return value
