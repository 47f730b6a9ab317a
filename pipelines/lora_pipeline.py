"""lora_pipeline: ingest -> validate -> format prompts -> QLoRA train -> evaluate vs base -> FP16 merge -> push.

    zenml pipeline run pipelines.lora_pipeline -c configs/default.yaml

Each step is a thin ZenML step over plain functions (see steps/). Every
artifact is versioned in the active ZenML stack and linked to the ZenML Model
named in the run config (`model:`), so each run makes one model version.
"""

from __future__ import annotations

from zenml import Model, pipeline

from core.config import PipelineConfig
from core.models import model_identity
from steps.evaluate import evaluate
from steps.format_prompts import format_prompts
from steps.ingest import ingest, source_fingerprint
from steps.merge import merge
from steps.push import push
from steps.train import train
from steps.validate import validate


@pipeline(enable_cache=True, model=Model(name="qlora-adapter", license="apache-2.0"))
def lora_pipeline(config: PipelineConfig) -> None:
    # Runs on the client while ZenML compiles the DAG: the data's fingerprint
    # becomes an ingest parameter, so edited data misses the cache and
    # identical data hits it (ZenML hashes step code and parameters, not files).
    # Likewise the base model's identity (GGUF file, local folder contents, Hub
    # revision) keys every step that loads it.
    base_id = model_identity(config.model)
    raw = ingest(data=config.data, fingerprint=source_fingerprint(config.data))
    clean, _report = validate(raw, validation=config.validation)
    train_ds, eval_ds = format_prompts(clean, model=config.model, prompt=config.prompt, base_id=base_id)
    # train.num_processes > 1: the same training across N GPUs under accelerate (pipelines/accelerate_train.py),
    # with the same invocation id, so step settings under `steps: train:` and the lineage stay as they are.
    train_step = train
    if config.train.num_processes > 1:
        from pipelines.accelerate_train import train_accelerated as train_step
    adapter, metrics = train_step(
        train_ds,
        eval_ds,
        model=config.model,
        quant=config.quant,
        lora=config.lora,
        train=config.train,
        base_id=base_id,
        id="train",
    )
    report = evaluate(adapter, eval_ds, model=config.model, evaluate=config.evaluate, base_id=base_id)
    merged = merge(adapter, report, eval_ds, model=config.model, merge=config.merge, base_id=base_id)
    push(
        merged,
        adapter,
        report,
        metrics,
        model=config.model,
        lora=config.lora,
        train=config.train,
        push=config.push,
        promote_to=config.promote_to,
    )
