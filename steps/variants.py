"""One adapter among several: what the task-adapter and sweep-point steps share.

Task adapters (steps/task_adapters.py) and sweep points (steps/sweep.py) train and
evaluate exactly like the single run's train and evaluate steps, by calling the same
plain functions (steps.train.train_adapter, steps.evaluate.evaluate_adapter). Their
steps differ only in the names of their output artifacts (adapter_<task>,
sweep_adapter_<point>, ...), which ZenML fills in from the step's `substitutions`,
and in where their metrics are recorded.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from datasets import Dataset
from zenml import get_step_context
from zenml.logger import get_logger

from core.artifacts import ModelFolder, scratch_dir
from core.config import EvalConfig, LoraSettings, ModelSource, QuantConfig, TrainConfig
from core.reports import EvalReport, ModelScores, TrainMetrics
from steps.evaluate import evaluate_adapter
from steps.train import quiet_libraries, train_adapter

logger = get_logger(__name__)


def train_one(
    train_ds: Dataset,
    eval_ds: Dataset,
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    train: TrainConfig,
    base_id: str,
    label: str,
) -> tuple[ModelFolder, TrainMetrics, dict[str, Any]]:
    """steps.train's training, in a fresh scratch folder; returns the adapter, metrics and a flat summary."""
    quiet_libraries()
    out = scratch_dir(f"adapter-{label}-")
    adapter, metrics = train_adapter(train_ds, eval_ds, model, quant, lora, train, out / "adapter", base_id=base_id)
    summary = metrics.model_dump(exclude={"loss_curve", "eval_curve"})
    logger.info("%s: trained %d steps, final train loss %.4f", label, metrics.steps, metrics.final_train_loss)
    return adapter, metrics, summary


def evaluate_one(
    adapter: ModelFolder,
    eval_ds: Dataset,
    model: ModelSource,
    cfg: EvalConfig,
    label: str,
    reference: tuple[str, ModelScores] | None = None,
) -> EvalReport:
    """steps.evaluate's base-vs-fine-tuned scoring and gate for one adapter."""
    quiet_libraries()
    report = evaluate_adapter(adapter, eval_ds, model, cfg, stage_reference=reference)
    logger.info(
        "%s: eval loss base %.4f -> fine-tuned %.4f; ROUGE-L %.3f -> %.3f; gate %s",
        label,
        report.base.loss,
        report.tuned.loss,
        report.base.rouge_l,
        report.tuned.rouge_l,
        "passed" if report.gate_passed else "FAILED",
    )
    return report


def evaluation_summary(report: EvalReport) -> dict[str, Any]:
    """The scores in the shape steps.evaluate logs to a model version (and stage comparisons read back)."""
    return {
        "eval_dataset_hash": report.eval_dataset_hash,
        "base": report.base.model_dump(),
        "tuned": report.tuned.model_dump(),
        "gate_passed": report.gate_passed,
    }


def input_artifact_id(name: str, index: int = 0) -> UUID | None:
    """The artifact version id behind this step's input `name` (None outside a ZenML step)."""
    try:
        inputs = get_step_context().inputs
    except RuntimeError:
        return None
    items = inputs.get(name) or []
    return items[index].id if index < len(items) else None
