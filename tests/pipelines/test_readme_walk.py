"""The README's commands in the order a newcomer runs them, through the `zenml` CLI with the shipped default config
(the tiny model and a small task swapped in, everything else as shipped, `enable_cache: true` included), in one
ZenML store:

    run; rerun unchanged; rerun with another general-ability probe; rerun with GGUF export added;
    the same on a stack with an MLflow tracker (make tracking; make run STACK=local-mlflow)

After each, the newest model version holds every result it is made of (training, evaluation, push, promotion)
and is promoted to staging; the export's GGUF is on the version it was exported for; the tracked run reaches
MLflow with the cached training's loss curve. Needs the `tracking` extra (MLflow): make test-integration.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, TINY_LORA, default_stack_plus, instruction_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed: make tracking"),
]
MODEL = "readme-walk"
RESULTS = {"training", "evaluation", "push", "promotion"}


def walk_config(root: Path, tiny_model_dir: Path, **changes) -> Path:
    """configs/default.yaml with the tiny model and a small task in, and `changes` (section -> keys) on top."""
    doc = yaml.safe_load((REPO_ROOT / "configs" / "default.yaml").read_text())
    doc["model"]["name"] = MODEL
    config = doc["parameters"]["config"]
    config["model"] = {"source": "local", "name": str(tiny_model_dir)}
    config["data"].update(path=str(root / "train.jsonl"), eval_path=str(root / "eval.jsonl"))
    config["lora"].update(TINY_LORA)
    config["train"].update(
        num_epochs=1,
        learning_rate=1e-2,
        tokens_per_micro_batch=None,
        micro_batch_size=4,
        checkpoint_dir=str(root / "ckpt"),
    )
    # a random tiny model never ends an answer, so it cannot write its own rehearsal: replay the set's answers
    config["train"]["replay"].update(answers="data", ratio=0.25)
    config["evaluate"].update(num_generate=2, max_new_tokens=4, general_max_new_tokens=4)
    for section, keys in changes.items():
        config.setdefault(section, {}).update(keys)
    path = root / f"config-{len(list(root.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def zenml_run(config: Path, stack: str | None = None) -> None:
    """`zenml pipeline run pipelines.lora_pipeline -c CONFIG [--stack STACK]`, as `make run` does."""
    zenml = Path(sys.executable).parent / "zenml"
    cmd = [str(zenml), "pipeline", "run", "pipelines.lora_pipeline", "-c", str(config)] + (
        ["--stack", stack] if stack else []
    )
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def newest_version():
    from zenml.client import Client

    return Client().list_model_versions(model=MODEL, sort_by="desc:number", size=1).items[0]


def assert_whole_and_staged(version) -> None:
    meta = version.run_metadata
    assert RESULTS <= set(meta), f"version {version.number} lacks {sorted(RESULTS - set(meta))}"
    assert version.stage == "staging", meta.get("promotion")
    assert meta["promotion"]["stage"] == "staging"


@pytest.fixture(scope="module")
def walk(zenml_home, tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("readme-walk")
    for name, rows in (("train.jsonl", instruction_rows(40)), ("eval.jsonl", instruction_rows(24, offset=40))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def linked_ids(version) -> set:
    """Every artifact version id linked to a model version."""
    from zenml.client import Client
    from zenml.utils.pagination_utils import depaginate

    links = depaginate(Client().list_model_version_artifact_links, model_version_id=version.id)
    return {link.artifact_version.id for link in links}


def run_statuses(version) -> dict[str, str]:
    from zenml.client import Client

    client = Client()
    (link,) = client.list_model_version_pipeline_run_links(model_version_id=version.id).items
    return {name: step.status.value for name, step in link.pipeline_run.steps.items()}


def test_every_readme_path_leaves_a_whole_promoted_version(walk, tiny_model_dir):
    from zenml.client import Client
    from zenml.enums import StackComponentType

    default = walk_config(walk, tiny_model_dir)
    zenml_run(default)  # make run
    first = newest_version()
    assert_whole_and_staged(first)

    zenml_run(default)  # the same again: every step but promote from the cache
    second = newest_version()
    assert second.number == first.number + 1
    assert_whole_and_staged(second)
    steps = run_statuses(second)
    assert steps["promote"] == "completed" and steps["train"] == steps["evaluate"] == "cached", steps
    assert second.run_metadata["training"] == first.run_metadata["training"]

    other_probe = walk_config(
        walk, tiny_model_dir, evaluate={"general": {"path": "data/general_probe_heldout/probe.jsonl"}}
    )
    zenml_run(other_probe)  # one evaluation setting changed: train cached, evaluate re-runs
    third = newest_version()
    assert_whole_and_staged(third)
    steps = run_statuses(third)
    assert steps["train"] == "cached" and steps["evaluate"] == "completed", steps
    assert third.run_metadata["training"] == first.run_metadata["training"]  # carried from the cached train's version
    assert third.run_metadata["evaluation"]["general"]["rows"] == 60

    exported = walk_config(
        walk,
        tiny_model_dir,
        evaluate={"general": {"path": "data/general_probe_heldout/probe.jsonl"}},
        export={"enabled": True, "types": ["f16"], "converter": "builtin"},
    )
    zenml_run(exported)  # export added: only export_gguf and promote run
    fourth = newest_version()
    assert_whole_and_staged(fourth)
    steps = run_statuses(fourth)
    assert steps["export_gguf"] == "completed" and steps["push"] == "cached", steps
    gguf = Client().get_artifact_version("gguf_model")  # the newest version of it: this run's export
    assert gguf.id in linked_ids(Client().get_model_version(MODEL, fourth.number))
    assert Client().get_model_version(MODEL, "staging").number == fourth.number

    # make tracking; make run STACK=local-mlflow: everything cached, yet MLflow gets the run and its loss curve
    stack_id, tracker_name = default_stack_plus(StackComponentType.EXPERIMENT_TRACKER, "mlflow", "walk-mlflow")
    stack = Client().get_stack(stack_id)
    zenml_run(exported, stack=stack.name)
    fifth = newest_version()
    assert_whole_and_staged(fifth)
    (link,) = Client().list_model_version_pipeline_run_links(model_version_id=fifth.id).items
    run = link.pipeline_run
    assert run.steps["train"].status.value == "cached"

    from mlflow.tracking import MlflowClient
    from zenml.stack import StackComponent

    tracker = StackComponent.from_model(
        Client().get_stack_component(StackComponentType.EXPERIMENT_TRACKER, tracker_name)
    )
    client = MlflowClient(tracking_uri=tracker.get_tracking_uri())
    experiment = client.get_experiment_by_name("lora_pipeline")
    (mlrun,) = client.search_runs([experiment.experiment_id], filter_string=f'tags.mlflow.runName = "{run.name}"')
    assert mlrun.data.tags["zenml.replayed_from_cache"] == "true"
    assert mlrun.data.tags["zenml.run_id"] == str(run.id)
    loss = client.get_metric_history(mlrun.info.run_id, "loss")
    metrics = run.steps["train"].outputs["train_metrics"][0].load()
    assert [(m.step, round(m.value, 6)) for m in loss] == [(s, round(v, 6)) for s, v in metrics.loss_curve]
    assert mlrun.data.metrics["finetuned_loss"] == pytest.approx(fifth.run_metadata["evaluation"]["tuned"]["loss"])
