"""docs/config.md is generated from PipelineConfig (cli/config_docs.py): it must be current, and every key documented."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel, Field

from cli import config_docs
from core.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]


def test_committed_docs_are_what_the_generator_writes():
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == config_docs.render(), (
        "docs/config.md is stale (core/config.py changed): regenerate it with `python -m cli.config_docs`"
    )


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field holds: itself, or inside Optional / list / dict / Union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _fields(model: type[BaseModel], prefix: str, seen: set[type[BaseModel]]):
    """(dotted path, FieldInfo, is a leaf) for every field reachable from `model`."""
    seen.add(model)
    for name, info in model.model_fields.items():
        nested = _models_in(info.annotation)
        yield f"{prefix}{name}", info, not nested
        for sub in nested:
            if sub not in seen:
                yield from _fields(sub, f"{prefix}{name}.", seen)


def test_every_leaf_field_has_a_description():
    fields = list(_fields(PipelineConfig, "", set()))
    leaves = [path for path, _, leaf in fields if leaf]
    assert {"train.replay.ratio", "data.mix.name", "evaluate.gate.min_eval_rows", "tasks.lora.r"} <= set(leaves)
    missing = [path for path, info, leaf in fields if leaf and not (info.description or "").strip()]
    assert not missing, f"give these fields a Field(description=...) in core/config.py: {missing}"
    # the sections too: their description is their row in the parent's table
    missing = [path for path, info, leaf in fields if not leaf and not (info.description or "").strip()]
    assert not missing, f"give these sections a Field(description=...) in core/config.py: {missing}"


def test_check_fails_on_a_stale_file_and_passes_on_a_current_one(tmp_path):
    current = config_docs.render()
    stale = tmp_path / "config.md"
    stale.write_text(current.replace("| `train.replay.ratio` |", "| `train.replay.share` |"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "cli.config_docs", "--check", "--output", str(stale)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stale" in done.stderr and "python -m cli.config_docs" in done.stderr
    assert stale.read_text(encoding="utf-8") != current, "--check must not rewrite the file"

    assert config_docs.main(["--check", "--output", str(tmp_path / "missing.md")]) == 1
    fresh = tmp_path / "fresh.md"
    assert config_docs.main(["--output", str(fresh)]) == 0
    assert fresh.read_text(encoding="utf-8") == current
    assert config_docs.main(["--check", "--output", str(fresh)]) == 0


class _Leaf(BaseModel):
    """A leaf model."""

    size: int = Field(1, ge=0, description="A size | with a pipe, in <units>.")


class _Shapes(BaseModel):
    """Every shape a config key can take."""

    by_name: dict[str, _Leaf] = Field(default_factory=dict, description="Leaves by name.")
    in_order: list[_Leaf] | None = Field(None, description="Leaves in a list.")
    one: _Leaf = Field(default_factory=lambda: _Leaf(size=3), description="One leaf.")
    kind: typing.Literal["a", "b"] = Field("a", description="A choice.")


def test_refs_nullables_choices_lists_and_dicts_render():
    text = config_docs.render(_Shapes)
    # a dict of models: its keys under <key>, documented once; the other places link there
    assert "## `by_name.<key>`" in text
    assert "| `by_name.<key>.size` | `int (≥ 0)` | `1` | A size \\| with a pipe, in &lt;units>. |" in text
    assert "| `in_order` | `list[_Leaf] \\| null` | `null` | Leaves in a list. Its keys are those of" in text
    # a model's default shows what differs from its keys' defaults
    assert '| `one` | `_Leaf` | `{"size": 3}` |' in text
    assert '| `kind` | `"a" \\| "b"` | `"a"` | A choice. |' in text
