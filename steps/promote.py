"""The last step of every kind of run: record what the run's model version holds, promote it to `promote_to` when
every candidate passed its quality gate, and write the model's history (core/evaluation/gate.py, core/runs/registry.py).

A single run and a sweep promote after push (so a failed upload never reaches a stage); a multi-task run after
summarize_tasks, with every task's report. Never cached: a rerun whose other steps are all cache hits still makes
a new model version, and this step gives it the results it holds (carried over from the versions they were
computed under), its stage, and a current `model_history`.

`enable_cache=False` alone does not make that so: a run config's top-level `enable_cache: true` (every shipped
config has one) overrides every step's own setting. So the pipeline also hands it `run_token`, a value new at every
compile (promote_inputs): its cache key never matches an earlier run's, however caching is configured.
"""

from __future__ import annotations

from typing import Annotated

from zenml import get_step_context, log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import MODEL_HISTORY, PROMOTION
from core.evaluation.gate import may_promote
from core.reports import EvalReport, ModelHistory, Promotion
from core.runs import registry, tracking
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(enable_cache=False, cache_policy=step_cache_policy(__name__))
def promote(
    eval_reports: list[EvalReport], promote_to: str | None = None, run_token: str = ""
) -> tuple[Annotated[Promotion, PROMOTION], Annotated[ModelHistory, MODEL_HISTORY]]:
    model_name = registry.current_model_name()
    carried = registry.carry_over_results("eval_reports")
    tracking.replay_cached(get_step_context().pipeline_run.id)  # a tracked stack gets what cached steps computed
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
    history = registry.model_history(model_name) if model_name else ModelHistory(model="(none)", versions=[])
    # the run's Metadata tab in the dashboard: the headline results, the stage, which version holds them
    version = get_step_context().model_version
    summary = (
        registry.headline({"evaluation": registry.evaluation_summary(eval_reports[0])})
        if len(eval_reports) == 1
        else {}
    )
    log_metadata(
        metadata={
            **{k: v for k, v in summary.items() if v is not None},
            "candidates": len(eval_reports),
            "gates_passed": sum(r.gate_passed for r in eval_reports),
            "stage": result.stage or "",
            "model_version": f"{model_name} #{version.number}" if version is not None else "",
            "carried_over": carried,
        },
        run_id_name_or_prefix=str(get_step_context().pipeline_run.id),
    )
    return result, history
