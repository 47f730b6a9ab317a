"""Run the tiny pipeline against a ZenML server and report its lineage as JSON (used by test_dashboard.py).

    ZENML_CONFIG_PATH=<a config logged in to the server> python tests/support/dashboard_run.py CONFIG.json OUT.json

A separate process, because the test session's own ZenML client is bound to its SQLite store
(tests/conftest.py); switching a live client between stores leaks state into later tests.
CONFIG.json holds {"model_name": ..., "config": <PipelineConfig dict>}. OUT.json gets the run's
id, name, dashboard URL, step statuses, each step's input and output artifact version ids, and
the ids linked to the run's model version, all read back through the ZenML client.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def main(config_path: str, out_path: str) -> None:
    from zenml import Model
    from zenml.client import Client
    from zenml.utils import dashboard_utils, source_utils

    from core.config import validate_config
    from pipelines.lora_pipeline import lora_pipeline

    source_utils.set_custom_source_root(str(REPO_ROOT))
    spec = json.loads(Path(config_path).read_text())
    run = lora_pipeline.with_options(model=Model(name=spec["model_name"]))(config=validate_config(spec["config"]))

    run = Client().get_pipeline_run(run.id)
    mv = run.model_version
    steps, visualizations = {}, {}
    for name, step in run.steps.items():
        steps[name] = {
            "status": str(step.status.value),
            "inputs": {k: [str(a.id) for a in v] for k, v in step.inputs.items()},
            "outputs": {k: [str(a.id) for a in v] for k, v in step.outputs.items()},
        }
        for name, versions in step.outputs.items():  # the HTML visualizations, as files in the artifact store
            html_files = [v.uri for v in versions[0].visualizations or [] if str(v.type.value).lower() == "html"]
            if html_files:
                visualizations[name] = html_files
    report = {
        "run_id": str(run.id),
        "run_name": run.name,
        "status": str(run.status.value),
        "url": dashboard_utils.get_run_url(run),
        "store_url": Client().zen_store.url,
        "steps": steps,
        "visualizations": visualizations,
        "model_version": None
        if mv is None
        else {
            "name": mv.name,
            "model": mv.model.name,
            "stage": mv.stage,
            "linked": sorted(
                str(a.id) for a in Client().list_artifact_versions(model_version_id=mv.id, size=1000).items
            ),
        },
    }
    Path(out_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
