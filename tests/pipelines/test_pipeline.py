"""The seven steps through a real ZenML store (temporary SQLite + local artifact store), on the tiny model."""

import json
import logging

import pytest
from conftest import TINY_LORA, TINY_TRAIN, instruction_rows
from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus, ModelStages
from zenml.utils.pagination_utils import depaginate

from core.config import validate_config

STEPS = ["ingest", "validate", "format_prompts", "load_probe", "train", "evaluate", "merge", "push", "promote"]
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
        # the bundled general-ability probe stays on (100 rows), with short answers: the tiny model's are noise
        "evaluate": {"num_generate": 2, "max_new_tokens": 8, "general_max_new_tokens": 4},
        # warn-only here: on this toy task a retrained candidate may tie with staging. The gate's
        # verdict is tested in test_quality_gate_stops_before_merge_and_push.
        "gate_warn": {"compare_with_stage": "staging", "on_fail": "warn", "min_eval_rows": 1},
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


def test_runs_end_to_end_then_fully_cached_then_data_change_reruns_everything(setup, capfd, recwarn, caplog):
    root, raw = setup
    caplog.set_level(logging.INFO, logger="core.training.trainer")
    first = _run(raw)
    assert _statuses(first) == dict.fromkeys(STEPS, ExecutionStatus.COMPLETED)
    # a quiet console: one progress line per logging step, no raw trainer dicts, no repeated library warnings
    out, err = capfd.readouterr()
    progress = [m for m in caplog.messages if m.startswith("step ") and "tokens/s" in m and "ETA" in m]
    assert len(progress) == 8 and progress[-1].startswith("step 8/8 [####################]")
    assert progress[3].startswith("step 4/8 [##########..........]")
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err
    # our calls into ZenML (promote's model history) use its current APIs, not ones it warns are deprecated
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    noisy = [str(w.message) for w in recwarn if "Could not find a config file" in str(w.message)]
    noisy += [str(w.message) for w in recwarn if "gradient_checkpointing" in str(w.message)]
    assert not noisy, noisy

    run = Client().get_pipeline_run(first.id)
    # lineage: every step's output is an artifact version of this run, linked to the model version
    mv = run.model_version
    assert mv is not None and mv.stage == "staging"
    links = depaginate(Client().list_model_version_artifact_links, model_version_id=mv.id)
    linked = {link.artifact_version.id for link in links}
    for step, output in [
        ("ingest", "raw_dataset"),
        ("validate", "clean_dataset"),
        ("format_prompts", "train_dataset"),
        ("train", "adapter"),
        ("evaluate", "eval_report"),
        ("merge", "merged_model"),
        ("push", "upload_bundle"),
    ]:
        assert run.steps[step].outputs[output][0].id in linked, f"{step}'s {output} is not on the model version"
    # exactly this run's outputs, every one of them: the version's links are the run's artifacts by id
    outputs = {a.id: f"{s.name}.{name}" for s in run.steps.values() for name, vs in s.outputs.items() for a in vs}
    assert linked == set(outputs), ([outputs[i] for i in set(outputs) - linked], linked - set(outputs))
    report = run.steps["evaluate"].outputs["eval_report"][0].load()
    assert report.tuned.loss < report.base.loss
    assert "evaluation" in mv.run_metadata and "training" in mv.run_metadata
    # the forgetting check: the probe set is an artifact of its own, scored for both models, on the model version
    probe = run.steps["load_probe"].outputs["general_dataset"][0]
    assert len(probe.load()) == report.general_rows == 100 and len(report.general_samples) == 100
    general = mv.run_metadata["evaluation"]["general"]
    assert general["rows"] == 100 and general["base"]["loss"] == pytest.approx(report.general_base.loss)
    assert any(m.startswith("general-ability loss") for m in report.gate_messages)
    bundle = run.steps["push"].outputs["upload_bundle"][0].load()
    assert "README.md" in bundle.files() and "config.json" in bundle.files()

    second = _run(raw)
    # every step a cache hit but promote, which records each run's model version (never cached)
    assert _statuses(second) == dict.fromkeys(STEPS, ExecutionStatus.CACHED) | {"promote": ExecutionStatus.COMPLETED}
    # no empty model version: the cached run's version holds the adapter, the scores, the push and the stage
    second_run = Client().get_pipeline_run(second.id)
    latest = Client().get_model_version("tiny-qlora", ModelStages.LATEST)
    assert latest.id == second_run.model_version.id and latest.number == mv.number + 1
    assert latest.stage == "staging"
    assert latest.run_metadata["evaluation"] == mv.run_metadata["evaluation"]
    assert {"training", "push"} <= set(latest.run_metadata)
    assert "adapter" in latest.model_artifact_ids and "eval_report" in latest.data_artifact_ids
    history = second_run.steps["promote"].outputs["model_history"][0].load()
    assert [v.number for v in history.versions] == [mv.number, latest.number]
    assert history.versions[-1].stage == "staging" and history.versions[-1].scores["gate_passed"] is True
    assert history.versions[-1].scores["tuned_loss"] == pytest.approx(report.tuned.loss)
    assert [[name for name, _ in v.runs] for v in history.versions] == [[first.name], [second_run.name]]
    run_meta = second_run.run_metadata  # the run's Metadata tab
    assert run_meta["stage"] == "staging" and {"evaluation", "training", "push"} <= set(run_meta["carried_over"])
    assert run_meta["tuned_loss"] == pytest.approx(report.tuned.loss)

    rows = instruction_rows(40)
    # Every other answer changes: 8 steps see 32 of the 40 rows (packed in length order), so one changed row
    # could be among those never seen, and training would rightly give the same adapter.
    for i in range(0, 40, 2):
        rows[i]["output"] = f"The code for item {i} is {90 + i}."
    _write(root / "train.jsonl", rows)
    third = _run(raw)
    # every step that reads the data reruns; the probe set does not depend on it and stays cached
    assert _statuses(third) == dict.fromkeys(STEPS, ExecutionStatus.COMPLETED) | {"load_probe": ExecutionStatus.CACHED}
    # the new candidate was gated against the staging version too, on the same eval data
    third_report = Client().get_pipeline_run(third.id).steps["evaluate"].outputs["eval_report"][0].load()
    assert f"staging (version {latest.number})" in third_report.reference_name


def test_training_setting_change_reruns_only_train_onwards(setup):
    root, raw = setup
    _run(raw)  # whatever the data is now: warm the cache
    changed = {**raw, "train": {**raw["train"], "learning_rate": 5e-3}}
    run = _run(changed)
    statuses = _statuses(run)
    assert [statuses[s] for s in STEPS[:4]] == [ExecutionStatus.CACHED] * 4  # ingest .. load_probe
    assert [statuses[s] for s in STEPS[4:]] == [ExecutionStatus.COMPLETED] * 5  # train onwards


def test_quality_gate_stops_before_merge_and_push(setup):
    _, raw = setup
    strict = {
        **raw,
        "evaluate": {**raw["evaluate"], "gate": {"min_loss_improvement": 0.99, "on_fail": "stop", "min_eval_rows": 1}},
    }
    with pytest.raises(RuntimeError, match="failure in step"):
        _run(strict, model_name="tiny-gated")
    run = Client().get_pipeline("lora_pipeline").last_run
    statuses = {name: step.status for name, step in run.steps.items()}
    assert statuses["evaluate"] in (ExecutionStatus.COMPLETED, ExecutionStatus.CACHED)
    assert statuses["merge"] == ExecutionStatus.FAILED
    assert "push" not in statuses and "promote" not in statuses  # never started: nothing pushed or promoted
    report = run.steps["evaluate"].outputs["eval_report"][0].load()
    assert not report.gate_passed
    assert "min_loss_improvement=0.99) -> FAIL" in "\n".join(report.gate_messages)
    # the run's model version holds the scores that stopped it, and no stage, push or promotion
    (version,) = depaginate(Client().list_model_versions, model="tiny-gated")
    assert version.id == run.model_version.id
    meta = Client().get_model_version("tiny-gated", version.id).run_metadata
    assert meta["evaluation"]["gate_passed"] is False
    assert version.stage is None and not {"push", "promotion"} & set(meta)
    outputs = {a.artifact.name for a in depaginate(Client().list_artifact_versions, pipeline_run=run.id)}
    assert not outputs & {"merged_model", "upload_bundle", "push_result", "promotion", "model_history"}, outputs
