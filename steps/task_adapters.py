"""Task adapters: one LoRA adapter per task on the same base, in one run.

    zenml pipeline run pipelines.lora_pipeline -c configs/multitask.yaml

For every entry of `tasks:` the pipeline runs its own chain, with step ids suffixed
by the task name: ingest_<task> -> validate_<task> -> format_prompts_<task> ->
train_<task> -> evaluate_<task>. The chains share no step, so ZenML caches each on
its own: editing one task's data re-runs only that task's chain.

- train_task: steps.train's training with the task's LoRA shape; outputs
  `adapter_<task>` and `train_metrics_<task>` (names filled in from the step's
  `substitutions={"task": <task>}`), the training summary on the adapter.
- evaluate_task: steps.evaluate's base-vs-fine-tuned scoring on the task's own
  held-out split; outputs `eval_report_<task>` and puts the scores on the adapter
  artifact too. Its gate compares with the base and with the same task's scores
  on the model version at `evaluate.gate.compare_with_stage`.
- summarize_tasks: every task's scores as one table (`task_summary`, HTML in the
  dashboard), all of them on the model version under `tasks`, and the version
  promoted to `promote_to` when every task passed its gate (a failed gate with
  on_fail=stop fails this step: the run fails and nothing is promoted).

There is no merge or push: merging several adapters into one model would blend the
tasks away. The adapters are the product, on the model version as adapter_<task>;
pipelines/serve_pipeline.py serves the base with all of them, switching per request.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

from datasets import Dataset
from pydantic import BaseModel
from zenml import get_step_context, log_metadata, step
from zenml.config.cache_policy import CachePolicy
from zenml.logger import get_logger

import materializers  # noqa: F401  (registers the folder, dataset and report materializers)
from core import models
from core.artifacts import HtmlReport, ModelFolder, html_table
from core.config import EvalConfig, LoraSettings, ModelSource, QuantConfig, TrainConfig
from core.reports import EvalReport, ModelScores, TrainMetrics
from materializers.dataset_materializer import dataset_content_hash
from steps import evaluate as evaluate_module
from steps import format_prompts as format_prompts_module
from steps import train as train_module
from steps import variants
from steps.merge import QualityGateError

logger = get_logger(__name__)

# ZenML hashes only the step function itself: add this file and everything its steps call.
SOURCES = [sys.modules[__name__], variants, train_module, evaluate_module, format_prompts_module, models]


def adapter_artifact(task: str) -> str:
    """The artifact name of a task's adapter; the serving pipeline calls that adapter `task`."""
    return f"adapter_{task}"


def task_stage_scores(model_name: str, stage: str, task: str, eval_hash: str) -> tuple[str, ModelScores] | None:
    """This task's scores on the model version now at `stage`, if scored on the same eval data."""
    from zenml.client import Client

    try:
        version = Client().get_model_version(model_name, stage)
    except KeyError:
        return None
    entry = (version.run_metadata.get("tasks") or {}).get(task)
    evaluation = entry.get("evaluation") if isinstance(entry, dict) else None
    if not isinstance(evaluation, dict) or evaluation.get("eval_dataset_hash") != eval_hash:
        logger.info("%s version %s has no scores for task %s on this eval data", stage, version.number, task)
        return None
    return f"{stage} (version {version.number})", ModelScores(**evaluation["tuned"])


@step(cache_policy=CachePolicy(source_dependencies=SOURCES))
def train_task(
    train_dataset: Dataset,
    eval_dataset: Dataset,
    task: str,
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    train: TrainConfig,
    base_id: str = "",
) -> tuple[Annotated[ModelFolder, "adapter_{task}"], Annotated[TrainMetrics, "train_metrics_{task}"]]:
    """`task` keys the cache too: two tasks with the same data and settings still get one adapter each."""
    adapter, metrics, summary = variants.train_one(
        train_dataset, eval_dataset, model, quant, lora, train, base_id, label=f"task {task}"
    )
    lora_meta = lora.model_dump(mode="json")
    log_metadata(
        metadata={"task": task, "lora": lora_meta, "training": summary},
        artifact_name=adapter_artifact(task),
        infer_artifact=True,
    )
    log_metadata(metadata=summary, artifact_name=f"train_metrics_{task}", infer_artifact=True)
    return adapter, metrics


@step(cache_policy=CachePolicy(source_dependencies=SOURCES))
def evaluate_task(
    adapter: ModelFolder,
    eval_dataset: Dataset,
    task: str,
    model: ModelSource,
    evaluate: EvalConfig,
    base_id: str = "",
) -> Annotated[EvalReport, "eval_report_{task}"]:
    """`base_id` (core.models.model_identity) keys the cache to the exact base weights."""
    version = get_step_context().model_version
    reference = None
    if evaluate.gate.compare_with_stage and version is not None:
        reference = task_stage_scores(
            version.model.name, evaluate.gate.compare_with_stage, task, dataset_content_hash(eval_dataset)
        )
    report = variants.evaluate_one(adapter, eval_dataset, model, evaluate, f"task {task}", reference)
    evaluation = variants.evaluation_summary(report)
    log_metadata(metadata={"task": task, **evaluation}, artifact_name=f"eval_report_{task}", infer_artifact=True)
    adapter_id = variants.input_artifact_id("adapter")
    if adapter_id is not None:  # the adapter artifact carries its own scores
        log_metadata(metadata={"evaluation": evaluation}, artifact_version_id=adapter_id)
    return report


class TaskRow(BaseModel):
    task: str
    adapter: str  # artifact name
    lora: dict[str, Any]
    eval_rows: int
    train_steps: int
    tokens_per_s: float
    peak_mem_bytes: int
    base: ModelScores
    tuned: ModelScores
    gate_passed: bool
    gate_messages: list[str]


def _modules(target_modules: str | list[str]) -> str:
    return target_modules if isinstance(target_modules, str) else ", ".join(target_modules)


class TaskSummary(HtmlReport):
    """Every task adapter of one run, side by side."""

    tasks: list[TaskRow]
    promoted_to: str | None = None

    def to_html(self) -> str:
        rows = [
            [
                t.task,
                t.adapter,
                f"r={t.lora['r']} alpha={t.lora['alpha']} on {_modules(t.lora['target_modules'])}",
                t.eval_rows,
                f"{t.base.loss:.4f} -> {t.tuned.loss:.4f}",
                f"{t.base.rouge_l:.3f} -> {t.tuned.rouge_l:.3f}",
                f"{t.base.exact_match:.3f} -> {t.tuned.exact_match:.3f}",
                t.train_steps,
                f"{t.tokens_per_s:.1f}",
                f"{t.peak_mem_bytes / 2**20:.0f}",
                "passed" if t.gate_passed else "FAILED",
            ]
            for t in self.tasks
        ]
        table = html_table(
            [
                "task",
                "adapter artifact",
                "LoRA",
                "eval rows",
                "eval loss (base -> tuned)",
                "ROUGE-L",
                "exact match",
                "train steps",
                "tokens/s",
                "peak memory (MiB)",
                "gate",
            ],
            rows,
        )
        stage = f"promoted to {self.promoted_to}" if self.promoted_to else "not promoted"
        return f"<h3>{len(self.tasks)} task adapters on one base ({stage})</h3>{table}"


def summarize(
    tasks: list[str], loras: list[dict[str, Any]], reports: list[EvalReport], metrics: list[TrainMetrics]
) -> TaskSummary:
    if not len(tasks) == len(loras) == len(reports) == len(metrics):
        raise ValueError(
            f"summarize_tasks: {len(tasks)} tasks, {len(loras)} LoRA settings, {len(reports)} eval reports and "
            f"{len(metrics)} train metrics; expected one of each per task"
        )
    return TaskSummary(
        tasks=[
            TaskRow(
                task=task,
                adapter=adapter_artifact(task),
                lora=lora,
                eval_rows=report.eval_rows,
                train_steps=m.steps,
                tokens_per_s=m.tokens_per_s,
                peak_mem_bytes=m.peak_mem_bytes,
                base=report.base,
                tuned=report.tuned,
                gate_passed=report.gate_passed,
                gate_messages=report.gate_messages,
            )
            for task, lora, report, m in zip(tasks, loras, reports, metrics)
        ]
    )


# Cacheable like push: a hit means these exact results were already summarized (and promoted) by the run it
# hits. A change to any task re-runs it.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], variants]))
def summarize_tasks(
    eval_reports: list[EvalReport],
    train_metrics: list[TrainMetrics],
    tasks: list[str],
    loras: list[dict[str, Any]],
    promote_to: str | None = None,
) -> Annotated[TaskSummary, "task_summary"]:
    """`eval_reports`, `train_metrics` and `loras` are in the order of `tasks`."""
    summary = summarize(tasks, loras, eval_reports, train_metrics)
    context = get_step_context()
    if context.model_version is not None:
        log_metadata(
            metadata={
                "tasks": {
                    row.task: {
                        "adapter": row.adapter,
                        "lora": row.lora,
                        "training": m.model_dump(exclude={"loss_curve", "eval_curve"}),
                        "evaluation": variants.evaluation_summary(report),
                    }
                    for row, report, m in zip(summary.tasks, eval_reports, train_metrics)
                }
            },
            infer_model=True,
        )
    failed = [row for row, report in zip(summary.tasks, eval_reports) if not report.gate_passed]
    stop = [
        row for row, report in zip(summary.tasks, eval_reports) if not report.gate_passed and report.on_fail == "stop"
    ]
    if stop:
        reasons = "\n  ".join(f"{row.task}: {m}" for row in stop for m in row.gate_messages if m.endswith("FAIL"))
        raise QualityGateError(
            f"quality gate failed for task(s) {', '.join(r.task for r in stop)}; model version not promoted:\n  {reasons}"
        )
    if failed:
        logger.warning("quality gate failed for %s (on_fail=warn): not promoting", ", ".join(r.task for r in failed))
    elif promote_to and context.model_version is not None:
        context.model.set_stage(promote_to, force=True)
        summary.promoted_to = promote_to
        logger.info("all %d task adapters passed their gates: model version promoted to '%s'", len(tasks), promote_to)
    return summary
