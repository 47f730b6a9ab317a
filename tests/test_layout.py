"""The layout rule (docs/layout.md): core/ is the library, steps/ wire it one step per file, pipelines/ hold DAGs;
and every step's cache key covers the core modules it reaches (core/runs/caching.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.runs.caching import project_dependencies

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in a file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", sorted((REPO / "core").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_core_imports_no_step_or_pipeline(path):
    assert not {n for n in _imports(path) if n.split(".")[0] in ("steps", "pipelines", "cli")}
    assert "@step" not in path.read_text()


@pytest.mark.parametrize("path", sorted((REPO / "steps").glob("*.py")), ids=lambda p: p.name)
def test_a_step_file_is_one_thin_step_importing_no_other_step(path):
    source = path.read_text()
    assert not {n for n in _imports(path) if n.split(".")[0] == "steps"}
    assert len(source.splitlines()) <= 100
    if path.name != "__init__.py":
        assert source.count("\n@step(") == 1, "one @step per file"


def test_a_step_cache_key_covers_every_core_module_it_reaches():
    deps = set(project_dependencies("steps.train"))
    # the step's own file, what it imports, and what those import in turn (trainer -> loss -> prompts,
    # trainer -> oom -> checkpoints, trainer -> cpu_share -> core.cpus)
    assert {"steps.train", "core.training.trainer", "core.training.distributed", "core.training.loss"} <= deps
    assert {"core.training.oom", "core.training.disk", "core.training.cpu_share", "core.training.compute"} <= deps
    assert {"core.training.packing", "core.training.checkpoints", "core.cpus"} <= deps
    assert "core.prompts" in deps and "core.models" in deps
    assert not {d for d in deps if d.startswith(("steps.", "pipelines.")) and d != "steps.train"}


def test_a_stage_borrows_shared_helpers_not_another_stage():
    # the export sizes llama.cpp's threads with core.cpus.usable_cpus, shared with training, not from core/training/
    deps = set(project_dependencies("steps.export_gguf"))
    assert "core.cpus" in deps and not {d for d in deps if d.startswith("core.training")}


def test_imports_inside_functions_count_too():
    # core.serving.model imports `materializers` only inside a function; the package's __init__ pulls in its modules
    deps = set(project_dependencies("core.serving.model"))
    assert {"materializers", "materializers.folder_materializer", "core.prompts"} <= deps


def test_every_cache_dependency_loads_in_a_fresh_step_process():
    """A step container or pod computes the step's cache key before anything has imported the modules of its cache
    policy, and ZenML loads "core.models" as getattr(core, "models"): each project package's __getattr__ must import
    the submodule (core/__init__.py), or every step fails there on a remote orchestrator (it did on the
    local-container stack: `AttributeError: module 'core' has no attribute 'artifacts'`)."""
    import os
    import subprocess
    import sys

    deps = sorted(
        {
            dep
            for p in (REPO / "steps").glob("*.py")
            if p.stem != "__init__"
            for dep in project_dependencies(f"steps.{p.stem}")
        }
    )
    assert {"core.artifacts", "core.training.distributed", "steps.train"} <= set(deps)
    code = "import sys\nfrom zenml.utils import source_utils\nfor dep in sys.argv[1:]:\n    source_utils.load(dep)\n"
    env = {**os.environ, "ZENML_CUSTOM_SOURCE_ROOT": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, *deps], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
