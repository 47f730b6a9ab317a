"""The whole pipeline under faults, through a real ZenML store on the tiny model, in hub mode against a fake Hub.

One sequence of runs (the `runs` fixture) serves every test here, to keep the number of pipeline runs small:

1. first:        everything runs; push publishes to the fake Hub with the token from HF_TOKEN (a sentinel);
                 its logs and output are captured
2. cached:       identical rerun
3. eval_changed: one evaluate setting changed
4. base_changed: the local base model's weights rewritten (same config and tokenizer)
5. failed:       data with a whitespace-only answer: validate fails (policy fail)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import linecache
import logging
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_LORA, TINY_TRAIN, build_tiny_model, instruction_rows
from huggingface_hub import constants
from support.hub_server import FakeHub
from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus
from zenml.orchestrators.cache_utils import generate_cache_key
from zenml.utils.pagination_utils import depaginate

from core import models
from core.config import validate_config

STEPS = ["ingest", "validate", "format_prompts", "train", "evaluate", "merge", "push", "promote"]
# Not the sentinel test_push.py uses: a hit here can only come from this module's runs.
SENTINEL = "hf_PIPELINEsentinelNEVERstore0123456789xyz"
MODEL_NAME = "faults-qlora"
pytestmark = pytest.mark.slow


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(raw: dict):
    from pipelines import lora_pipeline

    return lora_pipeline.with_options(model=Model(name=MODEL_NAME))(config=validate_config(raw)).id


def _statuses(run_id) -> dict[str, ExecutionStatus]:
    run = Client().get_pipeline_run(run_id)
    return {name: run.steps[name].status for name in STEPS if name in run.steps}


@contextlib.contextmanager
def _capture(path: Path):
    """Everything written to fd 1/2 (print, ZenML's console handler, C code) and every log record, while inside."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name} {record.levelname} {record.getMessage()} {record.exc_text or ''}")

    handler, root, hub_logger = Keep(logging.DEBUG), logging.getLogger(), logging.getLogger("huggingface_hub")
    levels = root.level, hub_logger.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    hub_logger.setLevel(logging.DEBUG)  # huggingface_hub's request-level debug lines too
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield records
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            root.removeHandler(handler)
            root.setLevel(levels[0]), hub_logger.setLevel(levels[1])


def _store_files() -> dict[str, tuple[int, int]]:
    """Every file in the local artifact store: relative path -> (size, mtime in ns)."""
    store = Path(Client().active_stack.artifact_store.path)
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()
    }


def _artifact_versions() -> dict[str, str]:
    """Every artifact version in the store: id -> artifact name."""
    return {str(v.id): v.artifact.name for v in depaginate(Client().list_artifact_versions)}


@pytest.fixture(scope="module")
def runs(zenml_home, tmp_path_factory, tiny_model_dir, bundled_tokenizer_dir):
    root = tmp_path_factory.mktemp("faults-pipeline")
    base = root / "base"  # a copy: its weights are rewritten below, the session's tiny model must not change
    shutil.copytree(tiny_model_dir, base)
    # File names of their own: row ids ("faults_train.jsonl:3") are part of the data, so no other module's runs
    # of the same rows can be cache hits here (nor these for them).
    _write(root / "faults_train.jsonl", instruction_rows(40))
    _write(root / "faults_eval.jsonl", instruction_rows(8, offset=40))
    bad = instruction_rows(40)
    bad[4]["output"] = " \t "  # line 5
    _write(root / "faults_train_bad.jsonl", bad)
    with pytest.MonkeyPatch.context() as mp, FakeHub() as hub:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode; the fake Hub is on 127.0.0.1
        mp.setenv("HF_TOKEN", SENTINEL)
        raw = {
            "model": {"source": "local", "name": str(base)},
            "data": {"path": str(root / "faults_train.jsonl"), "eval_path": str(root / "faults_eval.jsonl")},
            "lora": TINY_LORA,
            "train": {**TINY_TRAIN, "checkpoint_dir": str(root / "ckpt")},
            "evaluate": {
                "general": None,  # the probe: tests/pipelines/test_pipeline.py
                "num_generate": 2,
                "max_new_tokens": 8,
                "gate": {"compare_with_stage": "staging", "on_fail": "warn", "min_eval_rows": 1},
            },
            "push": {"mode": "hub", "repo_id": "tests/faults", "endpoint": hub.endpoint, "retry_wait_s": 0.01},
            "promote_to": "staging",
        }
        out = SimpleNamespace(hub=hub, root=root, raw=raw, checkpoints=root / "ckpt")
        with _capture(root / "first-run-output.txt") as records:
            out.first = _run(raw)
        out.logs = (root / "first-run-output.txt").read_text(errors="replace") + "\n".join(records)
        out.cached = _run(raw)
        changed = {**raw, "evaluate": {**raw["evaluate"], "max_new_tokens": 6}}
        out.eval_changed = _run(changed)
        build_tiny_model(base, bundled_tokenizer_dir, seed=1)  # new weights, same config and tokenizer
        out.base_changed = _run(changed)

        out.files_before, out.versions_before = _store_files(), _artifact_versions()
        with pytest.raises(RuntimeError):
            _run({**changed, "data": {**raw["data"], "path": str(root / "faults_train_bad.jsonl")}})
        out.failed = Client().get_pipeline("lora_pipeline").last_run.id
        out.files_after, out.versions_after = _store_files(), _artifact_versions()
        yield out


# --- secrets ------------------------------------------------------------------------------------------------------


def _json(value) -> str:
    return json.dumps(value, default=str)


def test_hub_token_appears_nowhere_but_in_the_requests_to_the_hub(runs, zenml_home):
    assert SENTINEL not in runs.logs
    assert "Hub token: from HF_TOKEN" in runs.logs and "Published" in runs.logs  # the capture did see the push

    run = Client().get_pipeline_run(runs.first)
    assert run.steps["push"].status == ExecutionStatus.COMPLETED
    assert SENTINEL not in run.config.model_dump_json()
    assert SENTINEL not in run.snapshot.model_dump_json()  # every step's configuration as compiled
    assert SENTINEL not in _json(run.run_metadata)
    for name, step in run.steps.items():
        assert SENTINEL not in step.config.model_dump_json(), name
        # what feeds the step's cache key besides code and inputs (see zenml.orchestrators.cache_utils)
        feeds = [step.config.parameters, step.config.caching_parameters, step.config.environment]
        assert SENTINEL not in _json(feeds + [str(s) for s in step.config.secrets]), name
        assert step.cache_key and SENTINEL not in step.cache_key
        assert SENTINEL not in _json(step.run_metadata), name
        for versions in step.outputs.values():
            for version in versions:
                assert SENTINEL not in _json(version.run_metadata), (name, version.artifact.name)
    assert SENTINEL not in _json(run.model_version.run_metadata)

    card = (run.steps["push"].outputs["upload_bundle"][0].load().path / "README.md").read_text()
    assert str(run.id) in card and SENTINEL not in card
    assert SENTINEL.encode() not in runs.hub.files("tests/faults")["README.md"]

    # Everything ZenML stored on disk: the SQLite store (and its WAL), artifacts, step logs; and the checkpoints.
    store = Path(Client().active_stack.artifact_store.path)
    for folder in {Path(zenml_home), store, runs.checkpoints}:
        for path in folder.rglob("*"):
            if path.is_file():
                assert SENTINEL.encode() not in path.read_bytes(), path

    # ... while the fake Hub did get it, on every request.
    assert len(runs.hub.requests) > 10
    assert {r.headers.get("authorization") for r in runs.hub.requests} == {f"Bearer {SENTINEL}"}


# --- caching ------------------------------------------------------------------------------------------------------


def test_first_run_completes_and_identical_rerun_is_fully_cached(runs):
    assert _statuses(runs.first) == dict.fromkeys(STEPS, ExecutionStatus.COMPLETED)
    # promote records every run's model version: never cached
    assert _statuses(runs.cached) == dict.fromkeys(STEPS, ExecutionStatus.CACHED) | {
        "promote": ExecutionStatus.COMPLETED
    }


def test_evaluate_setting_change_reruns_exactly_evaluate_onwards(runs):
    statuses = _statuses(runs.eval_changed)
    assert [statuses[s] for s in STEPS[:4]] == [ExecutionStatus.CACHED] * 4
    assert [statuses[s] for s in STEPS[4:]] == [ExecutionStatus.COMPLETED] * 4


def test_base_model_weights_change_reruns_format_prompts_onwards(runs):
    statuses = _statuses(runs.base_changed)
    assert [statuses[s] for s in STEPS[:2]] == [ExecutionStatus.CACHED] * 2
    assert [statuses[s] for s in STEPS[2:]] == [ExecutionStatus.COMPLETED] * 6
    before, after = (Client().get_pipeline_run(r).steps for r in (runs.eval_changed, runs.base_changed))
    identity = [s["format_prompts"].config.parameters["base"]["identity"] for s in (before, after)]
    assert identity[0] != identity[1]
    # the tokenizer did not change, so neither did the tokenized data: the base model's identity alone reran it
    assert (
        before["format_prompts"].outputs["train_dataset"][0].content_hash
        == after["format_prompts"].outputs["train_dataset"][0].content_hash
    )


def test_prompt_template_source_feeds_the_format_prompts_cache_key(runs, tmp_path, monkeypatch):
    """A template helper edit (here ALPACA_PROMPT) must miss the cache even though no parameter or input changed.

    ZenML hashes the step function's own code, not the helpers it calls; format_prompts' CachePolicy lists every
    core module it reaches (core.runs.caching.step_cache_policy). This recomputes ZenML's key for the real compiled step
    with core/prompts.py's source replaced by an edited copy.
    """
    import core.data.formatting as fmt
    import core.prompts as fp

    run = Client().get_pipeline_run(runs.first)
    step, step_run = run.snapshot.step_configurations["format_prompts"], run.steps["format_prompts"]

    def key() -> str:
        client = Client()
        return generate_cache_key(step, step_run.inputs, client.active_stack.artifact_store, client.active_project.id)

    assert key() == step_run.cache_key  # the same computation ZenML made for the run

    deps = {source.import_path for source in step.config.cache_policy.source_dependencies}
    for helper in (fp.render, fmt.tokenize_example, fp.with_system, fp.prompt_format, fmt.format_dataset):
        assert helper.__module__ in deps, helper
    assert models.load_tokenizer.__module__ in deps
    # evaluate reads the token layout (IGNORE labels) and renders prompts: a change there reruns it too
    evaluate_deps = run.snapshot.step_configurations["evaluate"].config.cache_policy.source_dependencies
    assert fp.__name__ in {s.import_path for s in evaluate_deps}

    source = inspect.getsource(fp)
    assert "### Response:" in source
    for name, text, same in [
        ("same.py", source, True),
        ("edited.py", source.replace("### Response:", "### Answer:"), False),
    ]:
        copy = tmp_path / name
        copy.write_text(text)
        monkeypatch.setattr(fp, "__file__", str(copy))  # inspect.getsource reads the module's __file__
        linecache.checkcache()
        assert (key() == step_run.cache_key) is same, name


# --- a failing run ------------------------------------------------------------------------------------------------


def test_failed_run_names_the_row_and_leaves_the_artifact_store_unchanged(runs):
    failed = Client().get_pipeline_run(runs.failed)
    assert failed.id not in (runs.first, runs.base_changed)
    statuses = {name: s.status for name, s in failed.steps.items()}
    assert statuses["ingest"] == ExecutionStatus.COMPLETED
    assert statuses["validate"] == ExecutionStatus.FAILED
    assert all(statuses.get(s) != ExecutionStatus.COMPLETED for s in STEPS[2:])  # nothing ran past validate
    info = failed.steps["validate"].exception_info
    assert info is not None
    assert "faults_train_bad.jsonl:5" in info.message and "expect_column_values_to_match_regex" in info.message

    # no new versions of the failed step's outputs (or of anything after it); only ingest's new raw_dataset
    new = {v: name for v, name in runs.versions_after.items() if v not in runs.versions_before}
    assert sorted(new.values()) == ["raw_dataset"]
    assert all(v in runs.versions_after for v in runs.versions_before)  # nothing removed
    # every file the store held before is still there, unchanged
    changed = {p: s for p, s in runs.files_before.items() if runs.files_after.get(p) != s}
    assert not changed, sorted(changed)[:10]
    # earlier artifacts still load
    cached = Client().get_pipeline_run(runs.base_changed).steps["validate"].outputs["clean_dataset"][0].load()
    assert len(cached) == 48
