"""lora_pipeline: ingest -> validate -> format prompts -> QLoRA train -> evaluate vs base -> FP16 merge -> push.

    zenml pipeline run pipelines.lora_pipeline -c configs/default.yaml
    zenml pipeline run pipelines.lora_pipeline -c configs/multitask.yaml   # one adapter per task
    zenml pipeline run pipelines.lora_pipeline -c configs/sweep.yaml       # a grid; the best point is shipped

Each step is a thin ZenML step over plain functions (see steps/). Every
artifact is versioned in the active ZenML stack and linked to the ZenML Model
named in the run config (`model:`), so each run makes one model version.

The config picks the shape of the DAG, which is built when the run is compiled:
- single run (`data:`): the seven steps above, once.
- `tasks:` one ingest_<task> -> validate_<task> -> format_prompts_<task> -> train_<task> ->
  evaluate_<task> chain per task, then summarize_tasks; no merge or push (steps/task_adapters.py).
- `sweep:` the shared data steps, then train_<point> and evaluate_<point> per grid point, then
  select_best, whose best point goes on to merge and push (steps/sweep.py).
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
from steps.sweep import evaluate_point, select_best, train_point
from steps.task_adapters import evaluate_task, summarize_tasks, train_task
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
    if config.tasks:
        task_adapters(config, base_id)
        return
    raw = ingest(data=config.data, fingerprint=source_fingerprint(config.data))
    clean, _report = validate(raw, validation=config.validation)
    train_ds, eval_ds = format_prompts(clean, model=config.model, prompt=config.prompt, base_id=base_id)
    lora, train_settings = config.lora, config.train
    if config.sweep:
        # the best point's adapter, report, metrics and settings (artifacts chosen at run time)
        adapter, report, metrics, lora, train_settings = sweep(config, train_ds, eval_ds, base_id)
    else:
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
    if config.export.enabled:  # the merged model as one GGUF file for llama.cpp / Ollama (steps/export_gguf.py)
        from steps.export_gguf import export_gguf

        export_gguf(merged, eval_ds, model=config.model, export=config.export, system_prompt=config.prompt.system_prompt)
    push(
        merged,
        adapter,
        report,
        metrics,
        model=config.model,
        lora=lora,
        train=train_settings,
        push=config.push,
        promote_to=config.promote_to,
    )


def task_adapters(config: PipelineConfig, base_id: str) -> None:
    """One chain per task, step ids suffixed with the task name; they share no step, so each caches on its own."""
    reports, metrics = [], []
    for task in config.tasks:
        name = task.name
        raw = ingest(data=task.data, fingerprint=source_fingerprint(task.data), id=f"ingest_{name}")
        clean, _report = validate(raw, validation=config.validation, id=f"validate_{name}")
        train_ds, eval_ds = format_prompts(
            clean, model=config.model, prompt=config.prompt, base_id=base_id, id=f"format_prompts_{name}"
        )
        # `substitutions` fill in the output names: adapter_<task>, train_metrics_<task>, eval_report_<task>
        per_task = {"task": name}
        adapter, train_metrics = train_task.with_options(substitutions=per_task)(
            train_ds,
            eval_ds,
            task=name,
            model=config.model,
            quant=config.quant,
            lora=config.task_lora(task),
            train=config.train,
            base_id=base_id,
            id=f"train_{name}",
        )
        report = evaluate_task.with_options(substitutions=per_task)(
            adapter,
            eval_ds,
            task=name,
            model=config.model,
            evaluate=config.evaluate,
            base_id=base_id,
            id=f"evaluate_{name}",
        )
        reports.append(report)
        metrics.append(train_metrics)
    summarize_tasks(
        reports,
        metrics,
        tasks=[t.name for t in config.tasks],
        loras=[config.task_lora(t).model_dump(mode="json") for t in config.tasks],
        promote_to=config.promote_to,
    )


def sweep(config: PipelineConfig, train_ds, eval_ds, base_id: str):
    """train_<point> + evaluate_<point> per grid point (independent steps), then select_best."""
    points = config.sweep_points()
    adapters, reports, metrics = [], [], []
    for point in points:
        per_point = {"point": point.id}  # output names: sweep_adapter_<point>, ...
        adapter, train_metrics = train_point.with_options(substitutions=per_point)(
            train_ds,
            eval_ds,
            point=point.id,
            model=config.model,
            quant=config.quant,
            lora=point.lora,
            train=point.train,
            base_id=base_id,
            id=f"train_{point.id}",
        )
        report = evaluate_point.with_options(substitutions=per_point)(
            adapter,
            eval_ds,
            point=point.id,
            model=config.model,
            evaluate=config.evaluate,
            base_id=base_id,
            id=f"evaluate_{point.id}",
        )
        adapters.append(adapter)
        reports.append(report)
        metrics.append(train_metrics)
    adapter, report, train_metrics, lora, train_settings, _table = select_best(
        adapters,
        reports,
        metrics,
        points=[p.id for p in points],
        values=[p.values for p in points],
        loras=[p.lora for p in points],
        trains=[p.train for p in points],
    )
    return adapter, report, train_metrics, lora, train_settings
