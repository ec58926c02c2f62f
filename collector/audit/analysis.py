"""The whole audit of one run: every section, the run's overview and summary.

Each ``audit_*`` function takes a ``RunData`` (what ``RunSource.load`` read of one run) and
returns a ``Section``: a verdict (``verdicts.VERDICTS``), the test and numbers behind it, and what
to plot. One module per assumption of the audit paper ("Reevaluating Theoretical Analysis Methods
for Optimization in Deep Learning") and one for MoXCo:

* ``convexity``: convexity along the path (§3.1) and global convexity (§3.2);
* ``smoothness``: smoothness as a proxy for sharpness (§4.1), with ``stability``: the edge of
  stability, judged by the preconditioned pair for Adam-family runs;
* ``descent``: the descent lemma and the random-scaling identity (§4.2-4.3);
* ``moxco_section``: MoXCo's goodness, phase and decisions.

The rules are stated in docs/audit.md; the statistics are ``stats``; the words ``verdicts``; which
convention each number follows ``conventions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from moxco.collector.audit.conventions import table_json
from moxco.collector.audit.convexity import (  # noqa: F401  (the public names of the audit, in one place)
    DEFAULT_DTYPE, DTYPE_EPS, TOLERANCE_FACTOR, audit_global_convexity, audit_path_convexity, gap_tolerance, run_dtype,
)
from moxco.collector.audit.descent import aligned, audit_descent  # noqa: F401
from moxco.collector.audit.moxco_section import audit_moxco, decision_line
from moxco.collector.audit.smoothness import (  # noqa: F401
    CONSTANT_SHARPNESS_RANGE, MIN_PAIRS, MIN_PAIRS_FOR_CORRELATION, MIN_RANGE_TO_REJECT, MIN_RANK_CORRELATION,
    SCALE_FACTOR, audit_smoothness, smoothness_pairs,
)
from moxco.collector.audit.source import AuditError, HttpSource, RunData, RunSource, StoreSource, open_source  # noqa: F401
from moxco.collector.audit.stats import Z, mean_and_standard_error, rank_correlation, sign_test  # noqa: F401
from moxco.collector.audit.verdicts import (  # noqa: F401
    DEGRADED, FAILS, HOLDS, INCONCLUSIVE, NOT_APPLICABLE, NOT_MEASURED, VERDICTS, Plot, Section, json_value,
    verdict_line,
)

SECTIONS = ("path_convexity", "global_convexity", "smoothness", "descent_lemma", "moxco")


@dataclass
class RunAudit:
    run: RunData
    sections: List[Section]
    overview: Dict[str, Any]
    plots: List[Plot]

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

    @property
    def summary(self) -> List[str]:
        """What the reader must know before the verdicts: the agent's stored errors, and the decisions
        with who took them."""
        lines = [f"the agent disabled its {group} metrics after an error: {message}"
                 for group, message in sorted(self.run.errors.items())]
        lines += [decision_line(d) for d in self.run.decisions]
        return lines

    def to_json(self) -> Dict[str, Any]:
        return {"run": self.run.name, "status": self.run.status, "source": self.run.source,
                "config": json_value(self.run.config), "overview": json_value(self.overview),
                "agent_errors": dict(self.run.errors), "summary": self.summary,
                "sections": {s.key: s.to_json() for s in self.sections},
                "verdicts": {s.key: s.verdict_line for s in self.sections},
                "conventions": table_json(),
                "plots": [p.key for p in self.all_plots()]}

    def all_plots(self) -> List[Plot]:
        return list(self.plots) + [p for s in self.sections for p in s.plots]


def audit(run: RunData, *, dtype: Optional[str] = None, tolerance_factor: float = TOLERANCE_FACTOR) -> RunAudit:
    """Every section of the audit of one run."""
    loss_steps, losses = run.get("loss")
    overview = {"steps": int(loss_steps.size), "first_step": int(loss_steps[0]) if loss_steps.size else None,
                "last_step": int(loss_steps[-1]) if loss_steps.size else None,
                "first_loss": float(losses[0]) if losses.size else math.nan,
                "last_loss": float(losses[-1]) if losses.size else math.nan,
                "optimizer": run.optimizer_name, "metrics": sorted(run.series)}
    plots = []
    if loss_steps.size:
        plots.append(Plot("loss", "training loss f(x_t, z_t)", "loss", {"steps": loss_steps, "loss": losses},
                          caption="The minibatch loss at every step."))
    sections = [audit_path_convexity(run, dtype=dtype, factor=tolerance_factor), audit_global_convexity(run),
                audit_smoothness(run), audit_descent(run), audit_moxco(run)]
    return RunAudit(run, sections, overview, plots)
