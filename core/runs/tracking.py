"""Live experiment tracking through the stack's experiment tracker (ZenML's MLflow flavor), when it has one.

    make tracking       # once: registers an MLflow tracker (its store: SQLite in the local artifact store) and a
                        # stack `local-mlflow` (default + the tracker)
    make run STACK=local-mlflow    # the default run, streaming to MLflow
    make mlflow-ui      # MLflow's UI on 127.0.0.1:5000

The pipelines give the train and evaluate steps the active stack's tracker (`step_options`, at compile time);
ZenML then opens an MLflow run around each such step (experiment = pipeline name, run = ZenML run name; sweep
points and task chains get one nested run each). Inside, `MlflowLogger` streams loss, learning rate, tokens/s and
eval loss at every logging step while training runs, after logging the LoRA, quantization and training
settings as params; `log_evaluation` logs base vs fine-tuned scores. Each MLflow run is tagged with the ZenML
run, step and model version. Without a tracker nothing here is imported or called.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def stack_tracker():
    """(name, flavor) of the active stack's experiment tracker, or None (also when no stack can be read)."""
    try:
        from zenml.client import Client

        trackers = Client().active_stack_model.components.get(_tracker_type())
    except Exception:  # no store or stack: no tracker
        return None
    return (trackers[0].name, trackers[0].flavor_name) if trackers else None


def _tracker_type():
    from zenml.enums import StackComponentType

    return StackComponentType.EXPERIMENT_TRACKER


def step_options(candidate) -> dict[str, Any]:
    """with_options(...) for a train or evaluate step: the stack's tracker and, with MLflow, a nested run for a
    sweep point or task (so each gets its own curves) instead of the pipeline run's shared one. {} without one."""
    tracker = stack_tracker()
    if tracker is None:
        return {}
    name, flavor = tracker
    options: dict[str, Any] = {"experiment_tracker": name}
    if flavor == "mlflow":
        options["settings"] = {f"experiment_tracker:{name}": {"nested": candidate.kind != "single"}}
    return options


def active_run():
    """The MLflow run ZenML opened around this step, or None (no tracker, or mlflow not installed)."""
    if importlib.util.find_spec("mlflow") is None:
        return None
    import mlflow

    return mlflow.active_run()


def tag_run(candidate=None) -> None:
    """Link the MLflow run to ZenML: the run, the step and the model version."""
    import mlflow
    from zenml import get_step_context

    try:
        context = get_step_context()
    except RuntimeError:
        return
    tags = {"zenml.run": context.pipeline_run.name, "zenml.run_id": str(context.pipeline_run.id)}
    tags["zenml.step"] = context.step_run.name
    model = context.pipeline_run.model_version
    if model is not None:
        tags["zenml.model"] = f"{model.model.name} version {model.number}"
    if candidate is not None and candidate.name:
        tags[f"zenml.{candidate.kind}"] = candidate.name
    mlflow.set_tags(tags)


def flat_params(**groups) -> dict[str, Any]:
    """{"lora.r": 16, "train.learning_rate": 0.0015, ...} from pydantic settings objects, lists joined."""
    out = {}
    for prefix, settings in groups.items():
        for key, value in settings.model_dump(mode="json").items():
            if isinstance(value, dict):
                continue
            out[f"{prefix}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


class MlflowLogger(TrainerCallback):
    """Streams each logging step to the active MLflow run: loss, learning_rate, grad_norm, tokens_per_s, eval_loss
    (x axis: the optimizer step), after logging the run's settings as params."""

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.start = time.perf_counter()
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kw):
        import mlflow

        mlflow.log_params(self.params)
        self.start, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        import mlflow

        logs = logs or {}
        metrics = {k: float(logs[k]) for k in ("loss", "learning_rate", "grad_norm", "eval_loss") if k in logs}
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            metrics["tokens_per_s"] = (state.num_input_tokens_seen - self.tokens_at_start) / elapsed
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)


def training_callbacks(candidate, **settings) -> list:
    """[MlflowLogger] inside a tracked step, else []."""
    if active_run() is None:
        return []
    tag_run(candidate)
    return [MlflowLogger(flat_params(**settings))]


def log_evaluation(report, candidate=None) -> None:
    """Base vs fine-tuned scores of an EvalReport on the active MLflow run (nothing without one)."""
    if active_run() is None:
        return
    import mlflow

    tag_run(candidate)
    metrics = {}
    sides = [("base", report.base), ("finetuned", report.tuned)]
    sides += [("general_base", report.general_base), ("general_finetuned", report.general_tuned)]
    for side, scores in sides:
        for key in ("loss", "perplexity", "rouge_l", "exact_match", "bleu"):
            value = getattr(scores, key, None)
            if value is not None:
                metrics[f"{side}_{key}"] = float(value)
    if getattr(report, "preference", None) is not None:  # a preference run's held-out pairs
        for side in ("base", "start", "tuned"):
            scores = getattr(report.preference, side)
            metrics[f"preference_{side}_accuracy"] = scores.accuracy
            metrics[f"preference_{side}_reward_margin"] = scores.reward_margin
    metrics["gate_passed"] = float(bool(report.gate_passed))
    mlflow.log_metrics(metrics)


def replay_cached(run_id) -> list[str]:
    """Log the stored results of this run's cached train and evaluate steps to the active MLflow run; returns the
    step names replayed ([] without a tracker or without cached steps).

    A cached step does not run, so no MLflow run opens around it: a first run on a tracked stack after an untracked
    one (make run, then make run STACK=local-mlflow) would leave MLflow empty. The promote step, which runs in
    every run, carries the tracker instead and logs what the cached steps stored (loss and eval-loss curves at
    their optimizer steps, tokens/s, the evaluation's scores) with tags saying they were replayed from the cache
    and from which run. A sweep point's or task's steps get a nested MLflow run each, named by the step.
    """
    if active_run() is None:
        return []
    import mlflow

    from core.reports import EvalReport, TrainMetrics
    from core.runs import registry

    replayed = []
    for step in registry.cached_steps(run_id):
        if not step.name.startswith(("train", "evaluate")):
            continue
        original = registry.step_run_pipeline_run(step.original_step_run_id)
        nested = step.name not in ("train", "evaluate")
        with mlflow.start_run(run_name=step.name, nested=True) if nested else contextlib.nullcontext():
            tag_run()
            mlflow.set_tags({"zenml.replayed_from_cache": "true", "zenml.cached_from_run": original.name})
            for artifacts in step.outputs.values():
                value = artifacts[0].load()
                if isinstance(value, TrainMetrics):
                    _log_train_metrics(value)
                elif isinstance(value, EvalReport):
                    log_evaluation(value)
        replayed.append(step.name)
    if replayed:
        logger.info("MLflow: %s replayed from the cache into run %s", ", ".join(replayed), active_run().info.run_id)
    return replayed


def _log_train_metrics(metrics) -> None:
    """A TrainMetrics' curves at their optimizer steps, and its summary, on the active MLflow run."""
    import mlflow

    for step, loss in metrics.loss_curve:
        mlflow.log_metric("loss", float(loss), step=int(step))
    for step, loss in metrics.eval_curve:
        mlflow.log_metric("eval_loss", float(loss), step=int(step))
    summary = {"tokens_per_s": metrics.tokens_per_s, "train_seconds": metrics.seconds, "steps": metrics.steps}
    mlflow.log_metrics({k: float(v) for k, v in summary.items() if v is not None})


def tracking_uri(component: str = "mlflow_tracker") -> str:
    """The MLflow tracking URI of the registered tracker `component` (what `make mlflow-ui` serves)."""
    from zenml.client import Client
    from zenml.stack import StackComponent

    model = Client().get_stack_component(_tracker_type(), component)
    return StackComponent.from_model(model).get_tracking_uri()


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["uri"]:
        print(tracking_uri())
    else:
        sys.exit("usage: python -m core.runs.tracking uri")
