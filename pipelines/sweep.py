"""The sweep DAG: one train + evaluate per grid point, then the best point is merged, pushed and promoted.

    ingest -> validate -> format_prompts -> train_<point> -> evaluate_<point> (per point)
           -> select_best -> merge -> push -> promote

Each point's train and evaluate are independent steps: an orchestrator that runs steps in parallel runs the
points in parallel (Kubernetes: one pod each), and ZenML caches each point on its own (adding a point to the
grid trains only the new one). Outputs are sweep_adapter_<point>, sweep_train_metrics_<point> and
sweep_eval_report_<point>; select_best returns the winner under the single run's names.
"""

from __future__ import annotations

from core.config import Candidate, PipelineConfig
from core.models import BaseModelRef
from pipelines.single_run import (
    general_probe,
    mix_training_data,
    prepare_data,
    replay_source,
    ship,
    train_and_evaluate,
)
from steps.select_best import select_best


def sweep_run(config: PipelineConfig, base: BaseModelRef) -> None:
    train_ds, eval_ds = prepare_data(config, base)
    general = general_probe(config, base)
    replay = replay_source(config, base, after=["format_prompts"])
    train_ds = mix_training_data(config, base, train_ds, eval_ds, general=general, replay=replay)
    points = config.sweep_points()
    adapters, reports, metrics = [], [], []
    for point in points:
        adapter, train_metrics, report = train_and_evaluate(
            config, base, train_ds, eval_ds, point.lora, point.train, Candidate(kind="point", name=point.id), general
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
    ship(config, base, adapter, report, train_metrics, eval_ds, lora, train_settings)
