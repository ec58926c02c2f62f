"""moxco.collector.audit: post-hoc assumption audits of stored runs (``moxco audit``, docs/audit.md).

* ``analysis``: the numbers and verdicts, one function per assumption of the audit paper (file 003);
* ``report``: self-contained HTML reports (embedded PNG plots) and JSON summaries, single runs and
  side-by-side comparisons;
* ``checkpoints``: checkpoint mode, the global metrics computed after the fact from saved weights;
* ``cli``: the ``moxco audit`` command.

Importing this package loads only NumPy and the storage layer; Matplotlib and tqdm are imported when
a report is drawn or checkpoints are evaluated.
"""

from moxco.collector.audit.analysis import AuditError, RunAudit, RunData, Section, audit

__all__ = ["AuditError", "RunAudit", "RunData", "Section", "audit"]
