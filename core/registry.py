"""The ZenML model registry: every read, write and promotion of a model version goes through here.

Each run is linked to the ZenML Model named in its config (`model:`), so each run makes one model version.
What steps record on it (the shape the stage comparisons read back):

    training:   the train metrics summary (single runs; a sweep's best point)
    evaluation: {eval_dataset_hash, base, tuned, gate_passed} (single runs; a sweep's best point)
    sweep:      {best, select_by, points} (sweeps)
    tasks:      {<task>: {adapter, lora, training, evaluation}} (multi-task runs)
    push:       what push uploaded (or would, in dry_run)
    promotion:  the stage promote set, or why it did not

These functions need a running ZenML step (its context) unless they take a model name.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from core.reports import EvalReport, ModelScores

logger = logging.getLogger(__name__)


def evaluation_summary(report: EvalReport) -> dict[str, Any]:
    """The scores in the shape logged to a model version under `evaluation` (and read back by stage_reference)."""
    return {
        "eval_dataset_hash": report.eval_dataset_hash,
        "base": report.base.model_dump(),
        "tuned": report.tuned.model_dump(),
        "gate_passed": report.gate_passed,
    }


def stage_reference(
    model_name: str, stage: str, eval_hash: str, task: str | None = None
) -> tuple[str, ModelScores] | None:
    """Scores of the model version now at `stage` (of `task`, for task adapters), if scored on the same eval data."""
    from zenml.client import Client

    try:
        version = Client().get_model_version(model_name, stage)
    except KeyError:
        return None
    if task is None:
        evaluation = version.run_metadata.get("evaluation")
    else:
        entry = (version.run_metadata.get("tasks") or {}).get(task)
        evaluation = entry.get("evaluation") if isinstance(entry, dict) else None
    if not isinstance(evaluation, dict) or evaluation.get("eval_dataset_hash") != eval_hash:
        what = f" for task {task}" if task else ""
        logger.info(
            "%s version %s has no scores%s on this eval data; gating against base only", stage, version.number, what
        )
        return None
    return f"{stage} (version {version.number})", ModelScores(**evaluation["tuned"])


def current_model_name() -> str | None:
    """The ZenML Model this step's run is linked to (None outside a step or without a model)."""
    from zenml import get_step_context

    try:
        version = get_step_context().model_version
    except RuntimeError:
        return None
    return version.model.name if version is not None else None


def record(metadata: dict[str, Any]) -> bool:
    """Log `metadata` on this run's model version; False (and nothing logged) when the run has none."""
    from zenml import log_metadata

    if current_model_name() is None:
        return False
    log_metadata(metadata=metadata, infer_model=True)
    return True


def promote(stage: str) -> bool:
    """Move this run's model version to `stage` (the version there before loses it); False without a model."""
    from zenml import get_step_context

    if current_model_name() is None:
        logger.warning("No ZenML model on this step or pipeline: nothing to promote.")
        return False
    get_step_context().model.set_stage(stage, force=True)
    return True


def input_artifact_id(name: str, index: int = 0) -> UUID | None:
    """The artifact version id behind this step's input `name` (None outside a ZenML step)."""
    from zenml import get_step_context

    try:
        inputs = get_step_context().inputs
    except RuntimeError:
        return None
    items = inputs.get(name) or []
    return items[index].id if index < len(items) else None
