"""The seven steps through a real ZenML store (temporary SQLite + local artifact store), on the tiny model."""

import json

import pytest
from conftest import TINY_LORA, TINY_TRAIN, instruction_rows
from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus

from core.config import validate_config

STEPS = ["ingest", "validate", "format_prompts", "train", "evaluate", "merge", "push", "promote"]
pytestmark = pytest.mark.slow


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(zenml_home, tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    _write(root / "train.jsonl", instruction_rows(40))
    _write(root / "eval.jsonl", instruction_rows(8, offset=40))
    raw = {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "data": {"path": str(root / "train.jsonl"), "eval_path": str(root / "eval.jsonl")},
        "lora": TINY_LORA,
        "train": {**TINY_TRAIN, "checkpoint_dir": str(root / "ckpt")},
        "evaluate": {"num_generate": 2, "max_new_tokens": 8},
        # warn-only here: on this toy task a retrained candidate may tie with staging. The gate's
        # verdict is tested in test_quality_gate_stops_before_merge_and_push.
        "gate_warn": {"compare_with_stage": "staging", "on_fail": "warn"},
        "push": {"mode": "dry_run", "repo_id": "tests/tiny"},
        "promote_to": "staging",
    }
    raw["evaluate"]["gate"] = raw.pop("gate_warn")
    return root, raw


def _run(raw, model_name="tiny-qlora"):
    from pipelines import lora_pipeline

    return lora_pipeline.with_options(model=Model(name=model_name))(config=validate_config(raw))


def _statuses(run):
    run = Client().get_pipeline_run(run.id)
    return {name: run.steps[name].status for name in STEPS if name in run.steps}


def test_runs_end_to_end_then_fully_cached_then_data_change_reruns_everything(setup):
    root, raw = setup
    first = _run(raw)
    assert _statuses(first) == dict.fromkeys(STEPS, ExecutionStatus.COMPLETED)

    run = Client().get_pipeline_run(first.id)
    # lineage: every step's output is an artifact version of this run, linked to the model version
    mv = run.model_version
    assert mv is not None and mv.stage == "staging"
    linked = {a for a in mv.data_artifact_ids} | {a for a in mv.model_artifact_ids}
    for step, output in [
        ("ingest", "raw_dataset"),
        ("validate", "clean_dataset"),
        ("format_prompts", "train_dataset"),
        ("train", "adapter"),
        ("evaluate", "eval_report"),
        ("merge", "merged_model"),
        ("push", "upload_bundle"),
    ]:
        assert run.steps[step].outputs[output][0].artifact.name in linked or output in {
            a.artifact.name for a in run.steps[step].outputs[output]
        }
    report = run.steps["evaluate"].outputs["eval_report"][0].load()
    assert report.tuned.loss < report.base.loss
    assert "evaluation" in mv.run_metadata and "training" in mv.run_metadata
    bundle = run.steps["push"].outputs["upload_bundle"][0].load()
    assert "README.md" in bundle.files() and "config.json" in bundle.files()

    second = _run(raw)
    assert _statuses(second) == dict.fromkeys(STEPS, ExecutionStatus.CACHED)

    rows = instruction_rows(40)
    # Every other answer changes: 8 steps see 32 of the 40 rows (packed in length order), so one changed row
    # could be among those never seen, and training would rightly give the same adapter.
    for i in range(0, 40, 2):
        rows[i]["output"] = f"The code for item {i} is {90 + i}."
    _write(root / "train.jsonl", rows)
    third = _run(raw)
    assert _statuses(third) == dict.fromkeys(STEPS, ExecutionStatus.COMPLETED)
    # the new candidate was gated against the staging version too, on the same eval data
    third_report = Client().get_pipeline_run(third.id).steps["evaluate"].outputs["eval_report"][0].load()
    assert "staging (version 1)" in third_report.reference_name


def test_training_setting_change_reruns_only_train_onwards(setup):
    root, raw = setup
    _run(raw)  # whatever the data is now: warm the cache
    changed = {**raw, "train": {**raw["train"], "learning_rate": 5e-3}}
    run = _run(changed)
    statuses = _statuses(run)
    assert [statuses[s] for s in STEPS[:3]] == [ExecutionStatus.CACHED] * 3
    assert [statuses[s] for s in STEPS[3:]] == [ExecutionStatus.COMPLETED] * 5


def test_quality_gate_stops_before_merge_and_push(setup):
    _, raw = setup
    strict = {**raw, "evaluate": {**raw["evaluate"], "gate": {"min_loss_improvement": 0.99, "on_fail": "stop"}}}
    with pytest.raises(RuntimeError, match="failure in step"):
        _run(strict, model_name="tiny-gated")
    run = Client().get_pipeline("lora_pipeline").last_run
    statuses = {name: step.status for name, step in run.steps.items()}
    assert statuses["evaluate"] in (ExecutionStatus.COMPLETED, ExecutionStatus.CACHED)
    assert statuses["merge"] == ExecutionStatus.FAILED
    assert "push" not in statuses or statuses["push"] != ExecutionStatus.COMPLETED
    logs_hint = run.steps["evaluate"].outputs["eval_report"][0].load()
    assert not logs_hint.gate_passed
