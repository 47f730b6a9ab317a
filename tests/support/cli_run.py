"""A run config through the `zenml` CLI, as a user runs it: `zenml pipeline run pipelines.lora_pipeline -c <path>`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_config(path: Path) -> subprocess.CompletedProcess:
    """The CLI run of `path` from the repository root, offline, its output captured."""
    zenml = Path(sys.executable).parent / "zenml"
    return subprocess.run(
        [str(zenml), "pipeline", "run", "pipelines.lora_pipeline", "-c", str(path)],
        cwd=REPO_ROOT,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
