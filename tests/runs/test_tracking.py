"""Live experiment tracking: the tiny pipeline on a stack with ZenML's MLflow experiment tracker.

The metrics are read back through MLflow's own client, and MLflow's UI (started here on 127.0.0.1, stopped at
the end) shows the loss chart in headless Chromium. Needs the `tracking` extra (make tracking); skipped without.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import TINY_LORA, TINY_TRAIN, default_stack_plus, instruction_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,  # MLflow's UI and Chromium: make test-integration
    pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed: make tracking"),
]


@pytest.fixture(scope="module")
def tracked_run(zenml_home, tmp_path_factory, tiny_model_dir):
    """The tiny single run on `default + an MLflow tracker`, active for this process only."""
    from zenml import Model
    from zenml.client import Client
    from zenml.enums import StackComponentType

    from core.config import validate_config
    from pipelines import lora_pipeline

    root = tmp_path_factory.mktemp("tracked")
    for name, rows in (("train.jsonl", instruction_rows(24)), ("eval.jsonl", instruction_rows(6, offset=24))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    stack_id, _ = default_stack_plus(StackComponentType.EXPERIMENT_TRACKER, "mlflow", "mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZENML_ACTIVE_STACK_ID", stack_id)
    try:
        raw = {
            "model": {"source": "local", "name": str(tiny_model_dir)},
            "data": {"path": str(root / "train.jsonl"), "eval_path": str(root / "eval.jsonl")},
            "lora": TINY_LORA,
            "train": {**TINY_TRAIN, "checkpoint_dir": str(root / "ckpt"), "logging_steps": 1, "eval_every": 2},
            "evaluate": {
                "general": None,
                "num_generate": 2,
                "max_new_tokens": 8,
                "gate": {"on_fail": "warn", "min_eval_rows": 1},
            },
            "push": {"mode": "dry_run", "repo_id": "tests/tiny"},
        }
        run = lora_pipeline.with_options(model=Model(name="tracked-tiny"))(config=validate_config(raw))
        tracker = Client().active_stack.experiment_tracker
        yield Client().get_pipeline_run(run.id), tracker.get_tracking_uri()
    finally:
        mp.undo()


def test_train_and_evaluate_stream_to_mlflow(tracked_run):
    from mlflow.tracking import MlflowClient

    run, uri = tracked_run
    assert run.status.value == "completed"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lora_pipeline")
    (mlrun,) = client.search_runs([experiment.experiment_id], filter_string=f'tags.mlflow.runName = "{run.name}"')
    loss = client.get_metric_history(mlrun.info.run_id, "loss")
    max_steps = run.steps["train"].outputs["train_metrics"][0].load().steps
    assert [m.step for m in loss] == list(range(1, max_steps + 1))  # every logging step, as it happened
    assert {m.key for m in [*client.get_metric_history(mlrun.info.run_id, "tokens_per_s")]} == {"tokens_per_s"}
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "eval_loss")][:2] == [2, 4]
    data = client.get_run(mlrun.info.run_id).data
    assert data.params["lora.r"] == str(TINY_LORA["r"]) and data.params["quant.load_in_4bit"] in ("True", "False")
    assert data.metrics["base_loss"] > data.metrics["finetuned_loss"] > 0  # evaluate's scores, same run
    assert data.tags["zenml.run_id"] == str(run.id) and data.tags["zenml.model"].startswith("tracked-tiny version")
    # a sweep point or task gets a nested run of its own on this stack; the single run shares the pipeline's
    from types import SimpleNamespace

    from core.runs.tracking import step_options

    name = data.tags["zenml.step"] and run.steps["train"].config.experiment_tracker
    assert step_options(SimpleNamespace(kind="point")) == {
        "experiment_tracker": name,
        "settings": {f"experiment_tracker:{name}": {"nested": True}},
    }
    assert step_options(SimpleNamespace(kind="single"))["settings"] == {f"experiment_tracker:{name}": {"nested": False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_shows_the_loss_chart(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient
    from support.browser import Browser, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium")
    run, uri = tracked_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lora_pipeline")
    (mlrun,) = client.search_runs([experiment.experiment_id], filter_string=f'tags.mlflow.runName = "{run.name}"')
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("MLflow UI did not start")
                time.sleep(0.5)
        with Browser(chromium) as browser:
            browser.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{mlrun.info.run_id}/model-metrics")
            browser.wait_for_text("Model metrics", "base_loss", timeout=90)
            # charts are listed A-Z and drawn as they scroll into view: ask for the training curves by name
            browser.type_into('input[placeholder="Search metric charts"]', "loss")
            text = browser.wait_for_text("eval_loss", "finetuned_loss", timeout=60)
            assert "tokens_per_s" not in text and "base_exact_match" not in text  # filtered to the loss charts
            # a chart is drawn, not only the metric names: plotly's SVG with its data trace
            browser.wait_for("document.querySelectorAll('svg .scatterlayer .trace').length", timeout=60)
            browser.screenshot(tmp_path / "mlflow-loss.png")
            assert (tmp_path / "mlflow-loss.png").stat().st_size > 10_000
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow ui runs its server in child processes: the whole group
        server.wait(timeout=30)
