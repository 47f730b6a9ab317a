"""The last step of every kind of run: promote the run's model version to `promote_to` when every candidate
it holds passed its quality gate (core/gate.py, core/registry.py).

A single run and a sweep promote after push (so a failed upload never reaches a stage); a multi-task run
after summarize_tasks, with every task's report.
"""

from __future__ import annotations

from typing import Annotated

from zenml import step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import registry
from core.caching import step_cache_policy
from core.gate import may_promote
from core.reports import EvalReport, Promotion

logger = get_logger(__name__)


# Cacheable like push: a hit means these exact reports were already promoted by the run it hits.
@step(cache_policy=step_cache_policy(__name__))
def promote(eval_reports: list[EvalReport], promote_to: str | None = None) -> Annotated[Promotion, "promotion"]:
    if not promote_to:
        result = Promotion(requested=None, reason="promote_to is not set")
    elif not may_promote(eval_reports):
        failed = sum(not r.gate_passed for r in eval_reports)
        result = Promotion(requested=promote_to, reason=f"{failed} of {len(eval_reports)} candidate(s) failed the gate")
    elif not registry.promote(promote_to):
        result = Promotion(requested=promote_to, reason="no ZenML model on this pipeline")
    else:
        result = Promotion(requested=promote_to, stage=promote_to, reason="every candidate passed its gate")
    logger.info("promotion: %s (%s)", result.stage or "not promoted", result.reason)
    registry.record({"promotion": result.model_dump()})
    return result
