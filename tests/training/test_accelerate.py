"""train.num_processes > 1: the train step trains across N processes with DDP under `accelerate launch`
(core/training/distributed.py), inside the same step, so the DAG, step settings and lineage do not change."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from conftest import TINY_LORA, TINY_TRAIN, instruction_rows

from core.config import LoraSettings, QuantConfig, TrainConfig, validate_config
from core.models import resolve_base


def _pipeline_config(root, tiny_model_dir, num_processes: int) -> dict:
    rows = instruction_rows(8)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "data": {"path": str(root / "train.jsonl")},
        "train": {"num_processes": num_processes},
    }


@pytest.mark.parametrize("num_processes", [1, 2])
def test_num_processes_keeps_the_train_step_and_its_outputs(zenml_home, tmp_path, tiny_model_dir, num_processes):
    from pipelines.lora_pipeline import lora_pipeline

    pipeline = lora_pipeline.copy()
    pipeline.prepare(config=validate_config(_pipeline_config(tmp_path, tiny_model_dir, num_processes)))
    invocation = pipeline.invocations["train"]  # same invocation id either way: `steps: train:` settings apply
    assert invocation.step.resolve().import_path == "steps.train.train"
    assert invocation.parameters["train_cfg"].num_processes == num_processes
    # the same artifacts either way, so lineage and the later steps do not change
    assert set(invocation.step.entrypoint_definition.outputs) == {
        "{prefix}adapter{suffix}",
        "{prefix}train_metrics{suffix}",
    }
    assert set(pipeline.invocations["evaluate"].input_artifacts) >= {"adapter"}


@pytest.mark.slow
def test_train_step_runs_two_ddp_processes(tmp_path, tiny_source, tiny_splits, monkeypatch):
    """The step body, outside ZenML: two processes (gloo on CPU) train one adapter together."""
    import steps.train as train_step
    from core.runs import registry

    monkeypatch.setattr(train_step, "log_metadata", mock.MagicMock())  # needs a step context
    monkeypatch.setattr(registry, "record", mock.MagicMock(return_value=True))
    monkeypatch.chdir(tmp_path)
    train_ds, eval_ds = tiny_splits
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 2}, checkpoint_dir=str(tmp_path / "ckpt"), num_processes=2)
    adapter, metrics = train_step.train.entrypoint(
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        base=resolve_base(tiny_source),
        quant=QuantConfig(),
        lora=LoraSettings(**TINY_LORA),
        train_cfg=cfg,
    )
    job = adapter.path.parent
    ranks = sorted(json.loads(f.read_text())["rank"] for f in job.glob("rank-*.json"))
    assert ranks == [0, 1]
    assert all(json.loads(f.read_text())["world_size"] == 2 for f in job.glob("rank-*.json"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.files())
    assert metrics.steps == 2 and len(metrics.loss_curve) == 2
    logged = train_step.log_metadata.call_args_list[0].kwargs["metadata"]
    assert logged["num_processes"] == 2 and logged["steps"] == 2
    assert registry.record.call_args.args[0]["training"]["num_processes"] == 2
