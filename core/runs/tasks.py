"""Task adapters: one LoRA adapter per task on the same base, summarized side by side.

Each task (`tasks:` in the config) runs its own ingest -> validate -> format_prompts -> train -> evaluate
chain; summarize_tasks collects every task's scores into `task_summary` (summarize) and the model version.
There is no merge or push: merging several adapters into one model would blend the tasks away. The adapters
are the product, on the model version as adapter_<task>; pipelines/serve_pipeline.py serves the base with
all of them, switching per request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from core.artifact_names import ADAPTER, for_task
from core.artifacts import HtmlReport, html_table
from core.reports import EvalReport, ModelScores, TrainMetrics


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
        return f"<h3>{len(self.tasks)} task adapters on one base</h3>{table}"


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
                adapter=for_task(ADAPTER, task),  # the serving pipeline calls that adapter `task`
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
