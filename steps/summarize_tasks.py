"""Multi-task run, last step before promote: every task adapter's scores side by side (`task_summary`,
HTML in the dashboard), all of them on the model version under `tasks`, and the quality gate enforced for
every task (a failed gate with on_fail: stop fails this step, so nothing is promoted) (core/runs/tasks.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from zenml import step

import materializers  # noqa: F401  (registers the report materializer)
from core.artifact_names import TASK_SUMMARY
from core.evaluation.gate import enforce_gate
from core.reports import EvalReport, TrainMetrics
from core.runs import registry
from core.runs.caching import step_cache_policy
from core.runs.tasks import TaskSummary, summarize


@step(cache_policy=step_cache_policy(__name__))
def summarize_tasks(
    eval_reports: list[EvalReport],
    train_metrics: list[TrainMetrics],
    tasks: list[str],
    loras: list[dict[str, Any]],
) -> Annotated[TaskSummary, TASK_SUMMARY]:
    """`eval_reports`, `train_metrics` and `loras` are in the order of `tasks`."""
    summary = summarize(tasks, loras, eval_reports, train_metrics)
    per_task = {
        row.task: {
            "adapter": row.adapter,
            "lora": row.lora,
            "training": m.summary(),
            "evaluation": registry.evaluation_summary(report),
        }
        for row, report, m in zip(summary.tasks, eval_reports, train_metrics)
    }
    registry.record({"tasks": per_task})
    enforce_gate(dict(zip(tasks, eval_reports)), what="model version not promoted")
    return summary
