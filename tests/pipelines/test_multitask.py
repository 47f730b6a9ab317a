"""Task adapters: one adapter per task in one run (tiny model, real ZenML store), cached per task."""

import json

import pytest
from conftest import TINY_LORA, TINY_TRAIN
from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus

from core.config import ConfigError, validate_config

TASKS = ("codes", "aisles")
CHAIN = ("ingest", "validate", "format_prompts", "train", "evaluate")
MAX_NEW = 10  # tokens per greedy answer, in the pipeline and offline
pytestmark = pytest.mark.slow


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _question(i):
    return f"What is the code for item {i}?"


def codes_rows(lo, hi):
    return [
        {"instruction": _question(i), "input": "", "output": f"The code for item {i} is {i * 7 % 100}."}
        for i in range(lo, hi)
    ]


def aisles_rows(lo, hi):
    # the same questions with another task's answers, in other column names (mapped in the task's data source)
    return [{"question": _question(i), "answer": f"Aisle {i % 9 + 1}, shelf {i % 4 + 1}."} for i in range(lo, hi)]


@pytest.fixture(scope="module")
def setup(zenml_home, tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("multitask")
    _write(root / "codes_train.jsonl", codes_rows(0, 40))
    _write(root / "codes_eval.jsonl", codes_rows(40, 48))
    _write(root / "aisles_train.jsonl", aisles_rows(0, 40))
    _write(root / "aisles_eval.jsonl", aisles_rows(40, 48))
    raw = {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "tasks": [
            {
                "name": "codes",
                "data": {"path": str(root / "codes_train.jsonl"), "eval_path": str(root / "codes_eval.jsonl")},
            },
            {
                "name": "aisles",
                "data": {
                    "path": str(root / "aisles_train.jsonl"),
                    "eval_path": str(root / "aisles_eval.jsonl"),
                    "columns": {"instruction": "question", "output": "answer"},
                },
                "lora": {"r": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
            },
        ],
        "lora": TINY_LORA,
        # no intermediate checkpoints: saving them costs more than these few tiny steps
        "train": {**TINY_TRAIN, "save_every": 100, "checkpoint_dir": str(root / "ckpt")},
        "evaluate": {
            "general": None,  # the probe: tests/pipelines/test_pipeline.py
            "num_generate": 3,
            "max_new_tokens": MAX_NEW,
            "gate": {"on_fail": "warn", "compare_with_stage": None, "min_eval_rows": 1},
        },
        "promote_to": "staging",
    }
    return root, raw


def _run(raw):
    from pipelines import lora_pipeline

    return Client().get_pipeline_run(
        lora_pipeline.with_options(model=Model(name="tiny-tasks"))(config=validate_config(raw)).id
    )


def _statuses(run):
    return {name: step.status for name, step in run.steps.items()}


def _offline_answers(tiny_model_dir, adapter_dir, eval_ds, n, max_new_tokens):
    """Greedy answers from the base with the adapter loaded by peft straight from the artifact's folder."""
    from peft import PeftModel

    from core import models
    from core.config import ModelSource
    from core.evaluation.scoring import generate_answers

    source = ModelSource(source="local", name=str(tiny_model_dir))
    model = PeftModel.from_pretrained(models.load_base(source, quant=None), str(adapter_dir)).eval()
    return generate_answers(model, models.load_tokenizer(source), eval_ds.select(range(n)), max_new_tokens, 8)


def test_one_adapter_per_task_each_matching_offline_generation(setup, tiny_model_dir):
    _, raw = setup
    run = _run(raw)
    statuses = _statuses(run)
    expected = {f"{s}_{t}" for t in TASKS for s in CHAIN} | {"summarize_tasks", "promote"}
    assert set(statuses) == expected  # no train/merge/push of a single run
    assert set(statuses.values()) == {ExecutionStatus.COMPLETED}

    # every adapter and report is its own artifact on the run's model version, with its metrics
    mv = Client().get_model_version("tiny-tasks", run.model_version.id)
    linked = set(mv.data_artifact_ids) | set(mv.model_artifact_ids)
    assert {"adapter_codes", "adapter_aisles", "eval_report_codes", "eval_report_aisles"} <= linked
    assert set(mv.run_metadata["tasks"]) == set(TASKS)

    answers, peft_configs = {}, {}
    for task in TASKS:
        adapter_art = run.steps[f"train_{task}"].outputs[f"adapter_{task}"][0]
        assert adapter_art.artifact.name == f"adapter_{task}"
        assert {"evaluation", "training", "lora"} <= set(adapter_art.run_metadata)
        report = run.steps[f"evaluate_{task}"].outputs[f"eval_report_{task}"][0].load()
        assert report.tuned.loss < report.base.loss  # each learned its own task
        eval_ds = run.steps[f"format_prompts_{task}"].outputs["eval_dataset"][0].load()
        adapter = adapter_art.load()
        offline = _offline_answers(tiny_model_dir, adapter.path, eval_ds, len(report.samples), MAX_NEW)
        assert offline == [s.tuned_answer for s in report.samples], task
        answers[task] = offline
        peft_configs[task] = json.loads((adapter.path / "adapter_config.json").read_text())
        assert mv.run_metadata["tasks"][task]["evaluation"]["tuned"]["loss"] == pytest.approx(report.tuned.loss)

    # the task's own LoRA shape, the rest inherited from the top-level lora
    codes_cfg, aisles_cfg = (peft_configs[t] for t in TASKS)
    assert (codes_cfg["r"], aisles_cfg["r"]) == (TINY_LORA["r"], 4)
    assert set(aisles_cfg["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    assert aisles_cfg["lora_alpha"] == codes_cfg["lora_alpha"] == TINY_LORA["alpha"]

    # same questions (both tasks ask "What is the code for item N?"), different adapters, different answers
    assert all(a != b for a, b in zip(answers["codes"], answers["aisles"])), answers

    summary = run.steps["summarize_tasks"].outputs["task_summary"][0]
    assert [row.task for row in summary.load().tasks] == list(TASKS)
    assert summary.visualizations  # rendered as HTML in the dashboard


def test_changing_one_tasks_data_reruns_only_that_task(setup):
    root, raw = setup
    first = _run(raw)  # warm (or hit) the cache
    rows = aisles_rows(0, 40)
    rows[5]["answer"] = "Aisle 9, shelf 9."
    _write(root / "aisles_train.jsonl", rows)
    second = _run(raw)
    statuses = _statuses(second)
    assert {s: statuses[f"{s}_codes"] for s in CHAIN} == dict.fromkeys(CHAIN, ExecutionStatus.CACHED)
    assert {s: statuses[f"{s}_aisles"] for s in CHAIN} == dict.fromkeys(CHAIN, ExecutionStatus.COMPLETED)
    assert statuses["summarize_tasks"] == ExecutionStatus.COMPLETED

    def adapter_id(run, task):
        return run.steps[f"train_{task}"].outputs[f"adapter_{task}"][0].id

    assert adapter_id(second, "codes") == adapter_id(first, "codes")
    assert adapter_id(second, "aisles") != adapter_id(first, "aisles")
    # the new model version still holds both adapters (the cached one is linked to it too)
    mv = Client().get_model_version("tiny-tasks", second.model_version.id)
    assert {"adapter_codes", "adapter_aisles"} <= set(mv.data_artifact_ids) | set(mv.model_artifact_ids)


def test_task_config_problems_are_all_reported():
    task = {"name": "qa", "data": {"path": "qa.jsonl"}}
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"path": "x.jsonl"}, "tasks": [task, task], "push": {"mode": "hub", "repo_id": "a/b"}})
    msg = str(err.value)
    assert "either `data`" in msg and "repeated: ['qa']" in msg and "push.mode 'hub'" in msg
    with pytest.raises(ConfigError, match=r"tasks\.0\.name: String should match pattern"):
        validate_config({"tasks": [{"name": "Q A", "data": {"path": "x"}}]})
    with pytest.raises(ConfigError, match="data is required"):
        validate_config({})
    with pytest.raises(ConfigError, match=r"tasks\.0\.lora\.r: Input should be greater than or equal to 1"):
        validate_config({"tasks": [{**task, "lora": {"r": 0}}]})
    cfg = validate_config({"lora": {"r": 16, "alpha": 32}, "tasks": [{**task, "lora": {"r": 4}}]})
    assert cfg.task_lora(cfg.tasks[0]).model_dump(include={"r", "alpha"}) == {"r": 4, "alpha": 32}
