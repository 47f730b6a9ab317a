"""Report pipeline runs of a ZenML server as JSON, artifacts loaded back through the ZenML client (used by
tests/infra/test_container_stack.py).

    ZENML_CONFIG_PATH=<a config logged in to the server> python tests/support/stack_report.py OUT.json [N] [STEP.OUTPUT ...]

The newest N runs (default 1), newest first: id, name, status, dashboard URL, model version, and per step its
status, exception message and output artifact versions (id, uri). Each STEP.OUTPUT named (e.g. train.train_metrics,
train.adapter) is loaded from the artifact store for every run where that step produced it: a pydantic report is
dumped, a folder artifact is listed. A separate process, because the test session's own ZenML client is bound to
its SQLite store (tests/conftest.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def _loaded(value) -> object:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "files"):  # core.artifacts.ModelFolder
        return {"files": value.files(), "size_bytes": value.size_bytes()}
    return repr(value)


def main(out_path: str, count: str = "1", *loads: str) -> None:
    from zenml.client import Client
    from zenml.utils import dashboard_utils, source_utils

    import materializers  # noqa: F401  (registers the project's materializers)

    source_utils.set_custom_source_root(str(REPO_ROOT))
    client = Client()
    runs = client.list_pipeline_runs(sort_by="desc:created", size=int(count), hydrate=True).items
    report = []
    for run in runs:
        steps, loaded = {}, {}
        for name, step in run.steps.items():
            info = step.exception_info
            steps[name] = {
                "status": str(step.status.value),
                "exception": None if info is None else f"{info.message}\n{info.traceback or ''}",
                "outputs": {k: [{"id": str(a.id), "uri": a.uri} for a in v] for k, v in step.outputs.items()},
            }
        for spec in loads:
            step_name, output = spec.split(".", 1)
            step = run.steps.get(step_name)
            if step is not None and step.outputs.get(output):
                loaded[spec] = _loaded(step.outputs[output][0].load())
        mv = run.model_version
        report.append(
            {
                "id": str(run.id),
                "name": run.name,
                "status": str(run.status.value),
                "url": dashboard_utils.get_run_url(run),
                "store_url": client.zen_store.url,
                "model_version": None if mv is None else {"id": str(mv.id), "name": mv.name, "model": mv.model.name},
                "steps": steps,
                "loaded": loaded,
            }
        )
    Path(out_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
