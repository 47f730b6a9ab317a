"""The multi-task DAG: one adapter per task on the same base, no merge or push.

    per task: ingest_<task> -> validate_<task> -> format_prompts_<task> [-> mix_data_<task>] -> train_<task>
              -> evaluate_<task>
    then:     summarize_tasks -> promote
    (train.replay: one replay chain, ingest_replay -> ... -> format_replay, mixed into every task's rows)

The chains share no step, so ZenML caches each on its own: editing one task's data re-runs only that task.
Outputs are adapter_<task>, train_metrics_<task> and eval_report_<task>; pipelines/serve_pipeline.py serves
the base with every adapter, switching per request.
"""

from __future__ import annotations

from core.config import Candidate, PipelineConfig
from core.models import BaseModelRef
from pipelines.single_run import (
    general_probe,
    mix_training_data,
    prepare_data,
    promote_run,
    replay_source,
    train_and_evaluate,
)
from steps.summarize_tasks import summarize_tasks


def multitask_run(config: PipelineConfig, base: BaseModelRef) -> None:
    reports, metrics = [], []
    prepared = {task.name: prepare_data(config, base, data=task.data, suffix=f"_{task.name}") for task in config.tasks}
    general = general_probe(config, base)  # one probe for every task's adapter
    # one set of replay rows, mixed into each task's own, once every task's data is formatted
    replay = replay_source(config, base, after=[f"format_prompts_{task.name}" for task in config.tasks])
    for task in config.tasks:
        train_ds, eval_ds = prepared[task.name]
        train_ds = mix_training_data(
            config, base, train_ds, eval_ds, data=task.data, suffix=f"_{task.name}", general=general, replay=replay
        )
        _adapter, train_metrics, report = train_and_evaluate(
            config,
            base,
            train_ds,
            eval_ds,
            config.task_lora(task),
            config.train,
            Candidate(kind="task", name=task.name),
            general=general,
        )
        reports.append(report)
        metrics.append(train_metrics)
    summarize_tasks(
        reports,
        metrics,
        tasks=[t.name for t in config.tasks],
        loras=[config.task_lora(t).model_dump(mode="json") for t in config.tasks],
    )
    promote_run(config, reports, after="summarize_tasks")
