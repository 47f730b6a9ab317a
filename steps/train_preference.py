"""Step 4b, train_preference: DPO, KTO or ORPO on preference data (trl's trainers, core/training/preference.py).

It continues `start_adapter` (the SFT stage's, or a model version's; None: a new adapter on the base) with the
same QLoRA loading, checkpoints and resume as train. Its outputs carry the run's names (adapter, train_metrics):
merge, push, export and serving take them as they take an SFT adapter.
"""

from __future__ import annotations

import json
from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import ADAPTER, TRAIN_METRICS
from core.artifacts import ModelFolder, scratch_dir
from core.config import Candidate, LoraSettings, QuantConfig, TrainConfig
from core.logs import quiet_libraries
from core.models import BaseModelRef
from core.reports import TrainMetrics
from core.runs import registry, tracking
from core.runs.caching import step_cache_policy
from core.training.preference import train_preference_adapter

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def train_preference(
    preference_train: Dataset,
    preference_eval: Dataset,
    base: BaseModelRef,
    quant: QuantConfig,
    lora: LoraSettings,
    train_cfg: TrainConfig,
    start_adapter: ModelFolder | None = None,
) -> tuple[Annotated[ModelFolder, ADAPTER], Annotated[TrainMetrics, TRAIN_METRICS]]:
    quiet_libraries()
    out = scratch_dir("adapter-")
    live = tracking.training_callbacks(Candidate(), lora=lora, quant=quant, train=train_cfg)  # MLflow, when tracked
    adapter, metrics = train_preference_adapter(
        preference_train,
        preference_eval,
        base,
        quant,
        lora,
        train_cfg,
        out / "adapter",
        start_adapter=start_adapter.path if start_adapter is not None else None,
        callbacks=live,
    )
    pref = train_cfg.preference
    summary = metrics.summary() | {
        "method": train_cfg.method,
        "preference_data": pref.data.where,
        "start_from": str(train_cfg.preference_start()),
        "beta": pref.beta,
    }
    logger.info("%s stage done: %s", train_cfg.method.upper(), json.dumps(summary))
    log_metadata(metadata=summary, artifact_name=TRAIN_METRICS, infer_artifact=True)
    registry.record({"training": summary})
    return adapter, metrics
