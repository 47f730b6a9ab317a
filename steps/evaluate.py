"""Step 5, evaluate: the fine-tuned model against the base (and the current stage) on the held-out split and
the general-ability probe, with the quality gate's verdict (core/evaluation/scoring.py, core/evaluation/gate.py).

Like train, one step for a single run, each task and each sweep point: `candidate` names its output.
"""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import EVAL_REPORT, per_candidate
from core.artifacts import ModelFolder, dataset_content_hash
from core.config import Candidate, EvalConfig
from core.evaluation.scoring import PreferenceInputs, evaluate_adapter
from core.logs import quiet_libraries
from core.models import BaseModelRef
from core.reports import EvalReport
from core.runs import registry, tracking
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__), substitutions=Candidate().substitutions())
def evaluate(
    adapter: ModelFolder,
    eval_dataset: Dataset,
    base: BaseModelRef,
    eval_cfg: EvalConfig,
    candidate: Candidate = Candidate(),
    general_dataset: Dataset | None = None,
    preference_dataset: Dataset | None = None,
    start_adapter: ModelFolder | None = None,
    start_name: str = "base",
    beta: float = 0.1,
) -> Annotated[EvalReport, per_candidate(EVAL_REPORT)]:
    quiet_libraries()
    model_name, stage = registry.current_model_name(), eval_cfg.gate.compare_with_stage
    reference = None
    if stage and model_name:
        task = candidate.name if candidate.kind == "task" else None
        reference = registry.stage_reference(model_name, stage, dataset_content_hash(eval_dataset), task=task)
    # a preference run: its held-out pairs, scored by the base, the adapter the stage started from and this one
    preference = (
        PreferenceInputs(preference_dataset, start_adapter, start_name, beta)
        if preference_dataset is not None
        else None
    )
    report = evaluate_adapter(
        adapter,
        eval_dataset,
        base,
        eval_cfg,
        stage_reference=reference,
        general_ds=general_dataset,
        preference=preference,
    )
    for line in report.gate_messages:
        logger.info("gate: %s", line)
    for line in report.summary_lines(candidate.label):  # held-out scores, the probe, held-out pairs
        logger.info(line)
    tracking.log_evaluation(report, candidate)  # MLflow, when tracked
    evaluation = registry.evaluation_summary(report)
    who = {candidate.kind: candidate.name} if candidate.name else {}
    log_metadata(metadata={**who, **evaluation}, artifact_name=candidate.artifact(EVAL_REPORT), infer_artifact=True)
    if candidate.kind == "task" and (adapter_id := registry.input_artifact_id("adapter")) is not None:
        log_metadata(metadata={"evaluation": evaluation}, artifact_version_id=adapter_id)  # scores on the adapter
    elif candidate.kind == "single":
        registry.record({"evaluation": evaluation})
    return report
