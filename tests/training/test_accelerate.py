"""train.num_processes > 1: the train step trains across N processes with DDP under `accelerate launch`
(core/training/distributed.py), inside the same step, so the DAG, step settings and lineage do not change."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
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


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _relative_difference(a: dict, b: dict) -> float:
    """|a - b| / |a| over every adapter tensor together (L2)."""
    assert a.keys() == b.keys()
    diff = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a)
    return (diff / sum(float((a[k].float() ** 2).sum()) for k in a)) ** 0.5


@pytest.mark.slow
def test_train_step_runs_two_ddp_processes(tmp_path, tiny_source, tiny_splits, monkeypatch):
    """The step body, outside ZenML: two processes (gloo on CPU) train one adapter together. Together: both ranks
    end with the same weights, and those are what one process training on the global batch (2 x 4 rows) gets, not
    what it gets from one rank's 4 rows alone. 8 rows unpacked, so every step's global batch is all of them (the
    ranks' shards and one process's batch hold the same rows, whatever order each sampler draws)."""
    import steps.train as train_step
    from core.runs import registry
    from core.training import train_adapter

    monkeypatch.setattr(train_step, "log_metadata", mock.MagicMock())  # needs a step context
    monkeypatch.setattr(registry, "record", mock.MagicMock(return_value=True))
    monkeypatch.chdir(tmp_path)
    train_ds, eval_ds = tiny_splits[0].select(range(8)), tiny_splits[1]
    base, lora = resolve_base(tiny_source), LoraSettings(**TINY_LORA)
    settings = {**TINY_TRAIN, "max_steps": 2, "packing": False}  # micro_batch_size 4 per process
    cfg = TrainConfig(**settings, checkpoint_dir=str(tmp_path / "ckpt"), num_processes=2)
    adapter, metrics = train_step.train.entrypoint(
        train_dataset=train_ds, eval_dataset=eval_ds, base=base, quant=QuantConfig(), lora=lora, train_cfg=cfg
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

    # all-reduced gradients: rank 1's own copy of the adapter is rank 0's, bit for bit
    ddp = _weights(adapter.path)
    rank1 = _weights(job / "adapter-rank1")
    assert ddp.keys() == rank1.keys() and all(torch.equal(ddp[k], rank1[k]) for k in ddp)
    # ... and it is one process's adapter trained on the global batch; a rank's half of it gives another adapter
    one = {}
    for name, micro_batch_size in (("global", 8), ("alone", 4)):
        single = TrainConfig(**{**settings, "micro_batch_size": micro_batch_size}, checkpoint_dir=str(tmp_path / name))
        folder, one[name] = train_adapter(train_ds, eval_ds, base, QuantConfig(), lora, single, tmp_path / name)
        one[name + "_weights"] = _weights(folder.path)
    assert _relative_difference(ddp, one["global_weights"]) < 1e-4  # 8e-6 measured
    assert [s for s, _ in metrics.loss_curve] == [s for s, _ in one["global"].loss_curve] == [1, 2]
    assert [x for _, x in metrics.loss_curve] == pytest.approx([x for _, x in one["global"].loss_curve], rel=1e-5)
    assert _relative_difference(ddp, one["alone_weights"]) > 1e-2  # 0.1 measured
