"""Step 4, train: QLoRA with bitsandbytes 4-bit, peft LoRA and trl's SFTTrainer (core/training/).

The same step trains a single run's adapter, each task's and each sweep point's: `candidate` names its
outputs (adapter, adapter_<task>, sweep_adapter_<point>; the pipeline passes the matching ZenML
`substitutions`) and keys the cache. With `train.num_processes > 1` it trains across that many processes
(one per GPU) with DDP under `accelerate launch` (core/training/distributed.py).
"""

from __future__ import annotations

import json
from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import ADAPTER, TRAIN_METRICS, per_candidate
from core.artifacts import ModelFolder, scratch_dir
from core.config import Candidate, LoraSettings, QuantConfig, TrainConfig
from core.logs import quiet_libraries
from core.models import BaseModelRef
from core.reports import TrainMetrics
from core.runs import registry, tracking
from core.runs.caching import step_cache_policy
from core.training import train_adapter
from core.training.distributed import train_distributed

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__), substitutions=Candidate().substitutions())
def train(
    train_dataset: Dataset,
    eval_dataset: Dataset,
    base: BaseModelRef,
    quant: QuantConfig,
    lora: LoraSettings,
    train_cfg: TrainConfig,
    candidate: Candidate = Candidate(),
) -> tuple[Annotated[ModelFolder, per_candidate(ADAPTER)], Annotated[TrainMetrics, per_candidate(TRAIN_METRICS)]]:
    quiet_libraries()
    out = scratch_dir("adapter-")
    if train_cfg.num_processes > 1:
        logger.info("training with accelerate across %d processes", train_cfg.num_processes)
        adapter, metrics = train_distributed(train_dataset, eval_dataset, base, quant, lora, train_cfg, out)
    else:
        live = tracking.training_callbacks(candidate, lora=lora, quant=quant, train=train_cfg)  # MLflow, when tracked
        adapter, metrics = train_adapter(
            train_dataset, eval_dataset, base, quant, lora, train_cfg, out / "adapter", callbacks=live
        )
    summary = metrics.summary()
    if train_cfg.num_processes > 1:
        summary["num_processes"] = train_cfg.num_processes
    logger.info("%s done: %s", candidate.label, json.dumps(summary))
    who = {candidate.kind: candidate.name} if candidate.name else {}
    log_metadata(metadata={**who, **summary}, artifact_name=candidate.artifact(TRAIN_METRICS), infer_artifact=True)
    if candidate.kind == "task":  # the adapter artifact carries its own settings (serving reads them)
        log_metadata(
            metadata={**who, "lora": lora.model_dump(mode="json"), "training": summary},
            artifact_name=candidate.artifact(ADAPTER),
            infer_artifact=True,
        )
    elif candidate.kind == "single":  # tasks and sweep points are recorded by summarize_tasks / select_best
        registry.record({"training": summary})
    elif candidate.kind == "sft_stage":  # a preference run's first stage; its preference stage records "training"
        registry.record({"sft_training": summary})
    return adapter, metrics
