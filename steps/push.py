"""Step 7, push: the merged model, the LoRA adapter and a model card to the Hugging Face Hub (core/hub/).

dry_run (the offline default) builds the exact upload folder as the `upload_bundle` artifact and uploads
nothing; hub publishes it through a verified candidate branch. Promotion is the next step's job (promote).
"""

from __future__ import annotations

from typing import Annotated

from zenml import get_step_context, step

import materializers  # noqa: F401  (registers the project's materializers)
from core.artifact_names import PUSH_RESULT, UPLOAD_BUNDLE
from core.artifacts import ModelFolder
from core.config import DataSource, LoraSettings, PushConfig, TrainConfig
from core.hub import push_model
from core.models import BaseModelRef
from core.reports import EvalReport, PushResult, TrainMetrics
from core.runs import registry
from core.runs.caching import step_cache_policy


# Cacheable: a hit means these exact inputs were already built (and, in hub mode, uploaded) by the run it hits.
@step(cache_policy=step_cache_policy(__name__))
def push(
    merged_model: ModelFolder,
    adapter: ModelFolder,
    eval_report: EvalReport,
    train_metrics: TrainMetrics,
    base: BaseModelRef,
    lora: LoraSettings,
    train_cfg: TrainConfig,
    push_cfg: PushConfig,
    data: DataSource | None = None,
) -> tuple[Annotated[ModelFolder, UPLOAD_BUNDLE], Annotated[PushResult, PUSH_RESULT]]:
    """Build the Hub upload folder (and upload it in hub mode); record what went where on the model version.
    `data`: the task's data source, for the card's data mixture row."""
    bundle, result = push_model(
        merged_model,
        adapter,
        eval_report,
        train_metrics,
        model=base,
        lora=lora,
        train=train_cfg,
        push=push_cfg,
        run_id=str(get_step_context().pipeline_run.id),
        data=data,
    )
    fields = ("mode", "repo_id", "total_bytes", "commit_url", "commit_oid", "revision", "pr_url")
    logged = {f: getattr(result, f) or ("" if f != "total_bytes" else 0) for f in fields}
    registry.record({"push": {**logged, "file_count": len(result.files)}})
    return bundle, result
