"""The shipped configs run to the end with the forgetting check on: configs/multitask.yaml, configs/sweep.yaml and
configs/container.yaml (on the local stack here; tests/test_container_stack.py runs it in containers) through the
`zenml` CLI, as shipped except for the tiny model, a few training steps and short answers: the bundled probe, the
shipped data, the replay and every gate setting stay as they are. A run that stops at its gate fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def tiny_version(name: str, root: Path, tiny_model_dir: Path) -> Path:
    doc = yaml.safe_load((REPO_ROOT / "configs" / name).read_text())
    doc.pop("settings", None)  # the container stack's image build settings: this runs on the local stack
    doc["model"]["name"] = f"shipped-{Path(name).stem}"
    config = doc["parameters"]["config"]
    config["model"] = {"source": "local", "name": str(tiny_model_dir)}
    config["train"].update(
        max_steps=6, learning_rate=5e-3, save_every=100, checkpoint_dir=str(root / "ckpt" / Path(name).stem)
    )
    # a random tiny model never ends an answer, so it cannot write its own rehearsal: replay the set's answers
    config["train"]["replay"]["answers"] = "data"
    config["evaluate"].update(num_generate=2, max_new_tokens=4, general_max_new_tokens=4)
    assert "general" not in config["evaluate"]  # the bundled probe: on by default
    path = root / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["multitask.yaml", "sweep.yaml", "container.yaml"])
def test_shipped_config_runs_to_the_end_with_the_probe_on(name, zenml_home, tmp_path, tiny_model_dir):
    from zenml.client import Client

    from cli.summary import summarize

    config = tiny_version(name, tmp_path, tiny_model_dir)
    zenml = Path(sys.executable).parent / "zenml"
    done = subprocess.run(
        [str(zenml), "pipeline", "run", "pipelines.lora_pipeline", "-c", str(config)],
        cwd=REPO_ROOT,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = Client().get_pipeline("lora_pipeline").last_run
    reports = [
        artifacts[0].load()
        for step_name, step in run.steps.items()
        if step_name.startswith("evaluate")
        for out, artifacts in step.outputs.items()
        if "eval_report" in out
    ]
    assert reports and all(r.general_rows == 100 for r in reports)  # every candidate scored on the probe
    assert all(any(m.startswith("general-ability loss") for m in r.gate_messages) for r in reports)
    assert any(s.startswith("mix_data") for s in run.steps)  # the shipped replay is mixed in
    summary = summarize(run)
    assert summary.count("general-ability probe, 100 rows") == len(reports)  # cli.summary shows every candidate
