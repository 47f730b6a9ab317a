"""Sweep, last step before merge: the grid point with the lowest held-out eval loss goes on (core/runs/sweep.py).

Takes every point's adapter, eval report and train metrics as lists (ZenML passes a list of upstream
artifacts as one input), records the comparison table `sweep_table` (HTML in the dashboard) and returns the
best point under the single run's names (adapter, eval_report, train_metrics) with its settings
(lora_settings, train_settings): merge, push and promote then run exactly as in a single run.
"""

from __future__ import annotations

from typing import Annotated, Any

from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401  (registers the folder, dataset and report materializers)
from core.artifact_names import ADAPTER, EVAL_REPORT, LORA_SETTINGS, SWEEP_TABLE, TRAIN_METRICS, TRAIN_SETTINGS
from core.artifacts import ModelFolder
from core.config import LoraSettings, TrainConfig
from core.reports import EvalReport, TrainMetrics
from core.runs import registry
from core.runs.caching import step_cache_policy
from core.runs.sweep import SELECT_BY, SweepTable, best_point

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def select_best(
    adapters: list[ModelFolder],
    eval_reports: list[EvalReport],
    train_metrics: list[TrainMetrics],
    points: list[str],
    values: list[dict[str, Any]],
    loras: list[LoraSettings],
    trains: list[TrainConfig],
) -> tuple[
    Annotated[ModelFolder, ADAPTER],
    Annotated[EvalReport, EVAL_REPORT],
    Annotated[TrainMetrics, TRAIN_METRICS],
    Annotated[LoraSettings, LORA_SETTINGS],
    Annotated[TrainConfig, TRAIN_SETTINGS],
    Annotated[SweepTable, SWEEP_TABLE],
]:
    """Every list is in the order of `points`."""
    i, table = best_point(points, values, eval_reports, train_metrics)
    logger.info("sweep: best of %d points is %s (eval loss %.4f)", len(points), points[i], table.rows[i].eval_loss)
    summary = train_metrics[i].summary()
    log_metadata(metadata={"sweep_point": points[i], **summary}, artifact_name=ADAPTER, infer_artifact=True)
    log_metadata(metadata={"best": points[i], "points": len(points)}, artifact_name=SWEEP_TABLE, infer_artifact=True)
    # on the model version as a single run's train and evaluate steps record them, plus the sweep
    sweep = {"best": points[i], "select_by": SELECT_BY}
    sweep["points"] = {r.point: {**r.values, "eval_loss": r.eval_loss} for r in table.rows}
    registry.record({"training": summary, "evaluation": registry.evaluation_summary(eval_reports[i]), "sweep": sweep})
    return adapters[i], eval_reports[i], train_metrics[i], loras[i], trains[i], table
