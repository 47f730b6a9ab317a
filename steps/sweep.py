"""Hyperparameter sweep: one train + evaluate per grid point, then the best point goes on.

    zenml pipeline run pipelines.lora_pipeline -c configs/sweep.yaml

`sweep.grid` (core/config.py:SweepConfig) expands into points such as r8_lr0.0005.
After the shared ingest -> validate -> format_prompts, each point gets its own
train_<point> and evaluate_<point> steps: independent steps of the DAG, so an
orchestrator that runs steps in parallel runs the points in parallel (Kubernetes:
one pod each), and ZenML caches each point on its own (adding a point to the grid
trains only the new one).

- train_point / evaluate_point: steps.train's training and steps.evaluate's scoring
  with the point's settings; outputs `sweep_adapter_<point>`,
  `sweep_train_metrics_<point>` and `sweep_eval_report_<point>`.
- select_best: takes every point's adapter, eval report and train metrics as lists
  (ZenML passes a list of upstream artifacts as one input), records the comparison
  table `sweep_table` (HTML in the dashboard) and returns the point with the lowest
  held-out eval loss as `adapter`, `eval_report` and `train_metrics` (the single
  run's names), and its settings as `lora_settings` / `train_settings`: merge and
  push then run exactly as in a single run.
"""

from __future__ import annotations

import html
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
from core.reports import EvalReport, TrainMetrics
from materializers.dataset_materializer import dataset_content_hash
from steps import evaluate as evaluate_module
from steps import format_prompts as format_prompts_module
from steps import train as train_module
from steps import variants
from steps.evaluate import stage_scores

logger = get_logger(__name__)

# ZenML hashes only the step function itself: add this file and everything its steps call.
SOURCES = [sys.modules[__name__], variants, train_module, evaluate_module, format_prompts_module, models]
SELECT_BY = "eval_loss"  # held-out response-token loss of the merged fine-tuned model (EvalReport.tuned.loss)


@step(cache_policy=CachePolicy(source_dependencies=SOURCES))
def train_point(
    train_dataset: Dataset,
    eval_dataset: Dataset,
    point: str,
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    train: TrainConfig,
    base_id: str = "",
) -> tuple[Annotated[ModelFolder, "sweep_adapter_{point}"], Annotated[TrainMetrics, "sweep_train_metrics_{point}"]]:
    adapter, metrics, summary = variants.train_one(
        train_dataset, eval_dataset, model, quant, lora, train, base_id, label=f"point {point}"
    )
    log_metadata(
        metadata={"point": point, **summary}, artifact_name=f"sweep_train_metrics_{point}", infer_artifact=True
    )
    return adapter, metrics


@step(cache_policy=CachePolicy(source_dependencies=SOURCES))
def evaluate_point(
    adapter: ModelFolder,
    eval_dataset: Dataset,
    point: str,
    model: ModelSource,
    evaluate: EvalConfig,
    base_id: str = "",
) -> Annotated[EvalReport, "sweep_eval_report_{point}"]:
    version = get_step_context().model_version
    reference = None
    if evaluate.gate.compare_with_stage and version is not None:
        reference = stage_scores(
            version.model.name, evaluate.gate.compare_with_stage, dataset_content_hash(eval_dataset)
        )
    report = variants.evaluate_one(adapter, eval_dataset, model, evaluate, f"point {point}", reference)
    log_metadata(
        metadata={"point": point, **variants.evaluation_summary(report)},
        artifact_name=f"sweep_eval_report_{point}",
        infer_artifact=True,
    )
    return report


class SweepRow(BaseModel):
    point: str
    values: dict[str, Any]  # grid key -> value
    eval_loss: float  # held-out response-token loss, nats (the selection metric)
    base_loss: float
    rouge_l: float
    exact_match: float
    final_train_loss: float
    train_steps: int
    tokens_per_s: float
    peak_mem_bytes: int
    seconds: float
    gate_passed: bool


class SweepTable(HtmlReport):
    """Every point of one sweep; `best` is the one carried on to merge and push."""

    select_by: str = SELECT_BY
    best: str
    rows: list[SweepRow]

    def to_html(self) -> str:
        keys = list(self.rows[0].values) if self.rows else []
        body = [
            [("best: " if r.point == self.best else "") + r.point]
            + [r.values.get(k) for k in keys]
            + [
                f"{r.eval_loss:.4f}",
                f"{r.rouge_l:.3f}",
                f"{r.exact_match:.3f}",
                f"{r.final_train_loss:.4f}",
                r.train_steps,
                f"{r.tokens_per_s:.1f}",
                f"{r.peak_mem_bytes / 2**20:.0f}",
                f"{r.seconds:.0f}",
                "passed" if r.gate_passed else "FAILED",
            ]
            for r in sorted(self.rows, key=lambda r: r.eval_loss)
        ]
        table = html_table(
            ["point", *keys]
            + [
                "eval loss",
                "ROUGE-L",
                "exact match",
                "train loss",
                "steps",
                "tokens/s",
                "peak memory (MiB)",
                "train s",
                "gate",
            ],
            body,
        )
        base = f"{self.rows[0].base_loss:.4f}" if self.rows else "n/a"
        return (
            f"<h3>Sweep: {len(self.rows)} points, best {html.escape(self.best)} (lowest held-out eval loss; "
            f"the base model's: {base})</h3>{table}"
        )


def best_point(
    points: list[str], values: list[dict[str, Any]], reports: list[EvalReport], metrics: list[TrainMetrics]
) -> tuple[int, SweepTable]:
    """Index of the point with the lowest held-out eval loss (the first of equals), and the comparison table."""
    if not points or not len(points) == len(values) == len(reports) == len(metrics):
        raise ValueError(
            f"select_best: {len(points)} points, {len(values)} settings, {len(reports)} eval reports and "
            f"{len(metrics)} train metrics; expected one of each per point, at least one point"
        )
    rows = [
        SweepRow(
            point=p,
            values=v,
            eval_loss=r.tuned.loss,
            base_loss=r.base.loss,
            rouge_l=r.tuned.rouge_l,
            exact_match=r.tuned.exact_match,
            final_train_loss=m.final_train_loss,
            train_steps=m.steps,
            tokens_per_s=m.tokens_per_s,
            peak_mem_bytes=m.peak_mem_bytes,
            seconds=m.seconds,
            gate_passed=r.gate_passed,
        )
        for p, v, r, m in zip(points, values, reports, metrics)
    ]
    best = min(range(len(rows)), key=lambda i: rows[i].eval_loss)
    return best, SweepTable(best=points[best], rows=rows)


@step(cache_policy=CachePolicy(source_dependencies=SOURCES))
def select_best(
    adapters: list[ModelFolder],
    eval_reports: list[EvalReport],
    train_metrics: list[TrainMetrics],
    points: list[str],
    values: list[dict[str, Any]],
    loras: list[LoraSettings],
    trains: list[TrainConfig],
) -> tuple[
    Annotated[ModelFolder, "adapter"],
    Annotated[EvalReport, "eval_report"],
    Annotated[TrainMetrics, "train_metrics"],
    Annotated[LoraSettings, "lora_settings"],
    Annotated[TrainConfig, "train_settings"],
    Annotated[SweepTable, "sweep_table"],
]:
    """Every list is in the order of `points`; returns the best point's outputs under the single run's names."""
    i, table = best_point(points, values, eval_reports, train_metrics)
    logger.info("sweep: best of %d points is %s (eval loss %.4f)", len(points), points[i], table.rows[i].eval_loss)
    summary = train_metrics[i].model_dump(exclude={"loss_curve", "eval_curve"})
    log_metadata(metadata={"sweep_point": points[i], **summary}, artifact_name="adapter", infer_artifact=True)
    log_metadata(metadata={"best": points[i], "points": len(points)}, artifact_name="sweep_table", infer_artifact=True)
    if get_step_context().model_version is not None:  # as the single run's train and evaluate steps log them
        log_metadata(
            metadata={
                "training": summary,
                "evaluation": variants.evaluation_summary(eval_reports[i]),
                "sweep": {
                    "best": points[i],
                    "select_by": SELECT_BY,
                    "points": {r.point: {**r.values, "eval_loss": r.eval_loss} for r in table.rows},
                },
            },
            infer_model=True,
        )
    return adapters[i], eval_reports[i], train_metrics[i], loras[i], trains[i], table
