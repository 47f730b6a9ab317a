"""train.num_processes > 1: the train step runs under accelerate (ZenML's run_with_accelerate) across N processes."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from conftest import TINY_LORA, TINY_TRAIN, instruction_rows

from core.config import LoraSettings, QuantConfig, TrainConfig, validate_config


def _pipeline_config(root, tiny_model_dir, num_processes: int) -> dict:
    rows = instruction_rows(8)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "data": {"path": str(root / "train.jsonl")},
        "train": {"num_processes": num_processes},
    }


@pytest.mark.parametrize(
    "num_processes, source",
    [(1, "steps.train.train"), (2, "pipelines.accelerate_train.train_accelerated")],
)
def test_num_processes_picks_the_train_step(zenml_home, tmp_path, tiny_model_dir, num_processes, source):
    from pipelines.lora_pipeline import lora_pipeline

    pipeline = lora_pipeline.copy()
    pipeline.prepare(config=validate_config(_pipeline_config(tmp_path, tiny_model_dir, num_processes)))
    step = pipeline.invocations["train"].step  # same invocation id either way: `steps: train:` settings apply
    assert step.resolve().import_path == source
    # both read and write the same artifacts, so lineage and the later steps do not change
    outputs = {"adapter", "train_metrics"}
    assert set(step.entrypoint_definition.outputs) == outputs
    assert set(pipeline.invocations["evaluate"].input_artifacts) >= {"adapter"}


def test_run_with_accelerate_cannot_wrap_the_train_step_directly():
    """Why pipelines/accelerate_train.py exists: ZenML's wrapper passes step arguments on a command line."""
    from zenml.utils.function_utils import _cli_wrapped_function

    from steps.train import train

    with pytest.raises(ValueError, match="Invalid argument types"):
        _cli_wrapped_function(train.entrypoint)


@pytest.mark.slow
def test_accelerated_train_step_runs_two_ddp_processes(tmp_path, tiny_source, tiny_splits, monkeypatch):
    """The step body, outside ZenML: two processes (gloo on CPU) train one adapter together."""
    from pipelines import accelerate_train

    monkeypatch.setattr(accelerate_train, "log_metadata", mock.MagicMock())  # needs a step context
    monkeypatch.chdir(tmp_path)  # the launcher script must not land in the checkout either way
    train_ds, eval_ds = tiny_splits
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 2}, checkpoint_dir=str(tmp_path / "ckpt"), num_processes=2)
    adapter, metrics = accelerate_train.train_accelerated.entrypoint(
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        model=tiny_source,
        quant=QuantConfig(),
        lora=LoraSettings(**TINY_LORA),
        train=cfg,
        base_id="tiny",
    )
    job = adapter.path.parent
    ranks = sorted(json.loads(f.read_text())["rank"] for f in job.glob("rank-*.json"))
    assert ranks == [0, 1]
    assert all(json.loads(f.read_text())["world_size"] == 2 for f in job.glob("rank-*.json"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.files())
    assert metrics.steps == 2 and len(metrics.loss_curve) == 2
    assert list(tmp_path.glob("*.py")) == []  # ZenML's launcher script ran in the job folder and is gone
    logged = accelerate_train.log_metadata.call_args_list[0].kwargs["metadata"]
    assert logged["num_processes"] == 2 and logged["steps"] == 2
