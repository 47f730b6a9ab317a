"""The ZenML model registry: every read, write and promotion of a model version goes through here.

Each run is linked to the ZenML Model named in its config (`model:`), so each run makes one model version.
What steps record on it (the shape the stage comparisons read back):

    training:   the train metrics summary (single runs; a sweep's best point)
    evaluation: {eval_dataset_hash, base, tuned, gate_passed} (single runs; a sweep's best point)
    sweep:      {best, select_by, points} (sweeps)
    tasks:      {<task>: {adapter, lora, training, evaluation}} (multi-task runs)
    push:       what push uploaded (or would, in dry_run)
    promotion:  the stage promote set, or why it did not
    feedback_<format>: the feedback rows ingested from the feedback store: {rows, completions: {id: version}, ...}

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
    summary = {
        "eval_dataset_hash": report.eval_dataset_hash,
        "base": report.base.model_dump(),
        "tuned": report.tuned.model_dump(),
        "gate_passed": report.gate_passed,
    }
    if report.general_base is not None and report.general_tuned is not None:  # the forgetting check
        summary["general"] = {
            "rows": report.general_rows,
            "base": report.general_base.model_dump(),
            "tuned": report.general_tuned.model_dump(),
        }
    if report.preference is not None:  # a preference run's held-out pairs
        p = report.preference
        summary["preference"] = {
            "rows": p.rows,
            "start": p.start_name,
            "base": p.base.model_dump(),
            "start_scores": p.start.model_dump(),
            "tuned": p.tuned.model_dump(),
            "tuned_minus_start": p.tuned_minus_start.model_dump(),
        }
    return summary


def version_adapter(model_name: str, version: str | int):
    """The adapter artifact of `model_name`'s version at a stage or with a number (a preference stage starts from
    it); a clear error when there is no such version or it holds no adapter."""
    from zenml.client import Client

    from core.artifact_names import ADAPTER

    try:
        found = Client().get_model_version(model_name, version)
    except KeyError as err:
        raise ValueError(
            f"train.preference.start_from: model {model_name!r} has no version {version!r} to start from"
        ) from err
    adapter = found.get_artifact(ADAPTER)
    if adapter is None:
        raise ValueError(
            f"train.preference.start_from: version {found.number} of {model_name!r} holds no {ADAPTER!r} artifact "
            "(a multitask or sweep version names its adapters otherwise)"
        )
    return adapter


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


# What a model version records about the results it holds (see the module docstring); `promotion` is per run.
# The feedback rows a feedback source's ingest recorded, one key per format (core/data/feedback.py:ingest_record).
FEEDBACK_KEYS = tuple(f"feedback_{fmt}" for fmt in ("instruction", "chat", "pairs", "unpaired"))
RESULT_KEYS = ("training", "sft_training", "evaluation", "push", "sweep", "tasks") + FEEDBACK_KEYS


def _producer_version_id(artifact_version_id: UUID) -> UUID | None:
    """The model version of the run whose step produced this artifact version."""
    from zenml.client import Client

    step_id = Client().get_artifact_version(artifact_version_id).producer_step_run_id
    return _run_version_id(step_id) if step_id is not None else None


def carry_over_results(input_name: str) -> list[str]:
    """Give this run's model version the results it holds but did not compute; returns the keys copied.

    A cached step does not run, so it records nothing on the new model version that the run creates: a rerun
    whose train step (or every step) is a cache hit would leave a version without its training, evaluation or push
    records (ZenML does link the cached artifacts to it). Every step of this run that was taken from the cache
    points at the step run that computed it, under some earlier version; so do the artifacts behind this step's
    input `input_name`. Every RESULT_KEYS entry those versions have and this one lacks is copied over, the newest
    version's first.
    """
    from zenml import get_step_context, log_metadata
    from zenml.client import Client

    context = get_step_context()
    if context.model_version is None:
        return []
    client = Client()
    current = client.get_model_version(context.model_version.model.name, context.model_version.id)
    sources = {_producer_version_id(a.id) for a in context.inputs.get(input_name) or []}
    sources |= {_run_version_id(step.original_step_run_id) for step in cached_steps(context.pipeline_run.id)}
    copied: dict[str, Any] = {}
    earlier = [client.get_model_version(current.model.name, v) for v in sources - {None, current.id}]
    # a cached step shared with another model's run (the same data prep) holds no results of this model
    earlier = [v for v in earlier if v.model.id == current.model.id]
    for version in sorted(earlier, key=lambda v: v.number, reverse=True):
        for key in RESULT_KEYS:
            if key in version.run_metadata and key not in current.run_metadata and key not in copied:
                copied[key] = version.run_metadata[key]
    if copied:
        log_metadata(metadata=copied, infer_model=True)
        logger.info("model version %s: %s carried over from the cached steps' versions", current.number, sorted(copied))
    return sorted(copied)


def cached_steps(run_id: UUID) -> list:
    """The steps of a pipeline run that were taken from the cache (each with its original_step_run_id)."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    run = Client().get_pipeline_run(run_id)
    return [s for s in run.steps.values() if s.status == ExecutionStatus.CACHED and s.original_step_run_id]


def step_run_pipeline_run(step_run_id: UUID):
    """The pipeline run a step run belongs to."""
    from zenml.client import Client

    client = Client()
    return client.get_pipeline_run(client.get_run_step(step_run_id).pipeline_run_id)


def _run_version_id(step_run_id: UUID) -> UUID | None:
    """The model version of the run that a step run belongs to."""
    run = step_run_pipeline_run(step_run_id)
    return run.model_version.id if run.model_version is not None else None


def headline(metadata: dict[str, Any]) -> dict[str, Any]:
    """The scores a person looks for first, from a model version's (or run's) metadata."""
    out: dict[str, Any] = {}
    evaluation = metadata.get("evaluation")
    if isinstance(evaluation, dict):
        for side in ("base", "tuned"):
            for metric in ("loss", "rouge_l", "exact_match"):
                out[f"{side}_{metric}"] = (evaluation.get(side) or {}).get(metric)
        out["gate_passed"] = evaluation.get("gate_passed")
        preference = evaluation.get("preference")
        if isinstance(preference, dict):  # a preference run: held-out pair accuracy, start -> tuned
            out["preference_accuracy"] = [
                (preference.get("start_scores") or {}).get("accuracy"),
                (preference.get("tuned") or {}).get("accuracy"),
            ]
    training = metadata.get("training")
    if isinstance(training, dict) and training.get("method", "sft") != "sft":
        out["method"] = training["method"]
    learned = feedback_completions(metadata)
    if learned:
        out["feedback_rows"] = len(learned)
    tasks = metadata.get("tasks")
    if isinstance(tasks, dict):
        for task, entry in tasks.items():
            scores = (entry or {}).get("evaluation") or {}
            out[f"{task}_loss"] = [(scores.get(s) or {}).get("loss") for s in ("base", "tuned")]
        out["gate_passed"] = all(((e or {}).get("evaluation") or {}).get("gate_passed") for e in tasks.values())
    return out


def feedback_completions(metadata: dict[str, Any]) -> dict[str, str]:
    """Completion id -> the version that answered it, for every feedback row a version's runs ingested (SFT rows
    and pairs of one completion counted once)."""
    found: dict[str, str] = {}
    for key in FEEDBACK_KEYS:
        record = metadata.get(key)
        if isinstance(record, dict):
            found.update(record.get("completions") or {})
    return found


def model_history(model_name: str):
    """Every version of `model_name`, oldest first, as a core.reports.ModelHistory (what the dashboard lacks)."""
    from zenml.client import Client
    from zenml.utils import dashboard_utils
    from zenml.utils.pagination_utils import depaginate

    from core.reports import ModelHistory, VersionRow

    client = Client()
    rows = []
    for version in depaginate(client.list_model_versions, model=model_name, sort_by="asc:number"):
        meta = version.run_metadata
        runs = []
        # The run links themselves (ModelVersionResponse.pipeline_run_ids is deprecated in ZenML 0.98 and logs so);
        # each carries its run's response, so no second fetch per run.
        for link in depaginate(client.list_model_version_pipeline_run_links, model_version_id=version.id):
            run = link.pipeline_run
            try:
                url = dashboard_utils.get_run_url(run) or ""
            except Exception:  # a run whose project cannot be read any more, a store without a dashboard
                url = ""
            runs.append((run.name, url))
        rows.append(
            VersionRow(
                number=version.number,
                created=version.created.strftime("%Y-%m-%d %H:%M"),
                stage=version.stage or "",
                scores=headline(meta),
                records=[k for k in RESULT_KEYS if k in meta],
                runs=runs,
            )
        )
    return ModelHistory(model=model_name, versions=rows)
