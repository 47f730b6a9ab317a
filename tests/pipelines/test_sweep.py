"""Hyperparameter sweep: one train + evaluate per grid point, the best goes on, each point cached on its own."""

import json

import pytest
from conftest import TINY_LORA, TINY_TRAIN, instruction_rows
from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus

from core.config import ConfigError, validate_config

pytestmark = pytest.mark.slow
SHARED = ("ingest", "validate", "format_prompts")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(zenml_home, tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sweep")
    # Items from 100 on: no other test module trains on these, so its cached shared steps
    # (ingest, validate, format_prompts) cannot match this module's first run.
    _write(root / "train.jsonl", instruction_rows(40, offset=100))
    _write(root / "eval.jsonl", instruction_rows(8, offset=140))
    raw = {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "data": {"path": str(root / "train.jsonl"), "eval_path": str(root / "eval.jsonl")},
        "lora": TINY_LORA,
        # no intermediate checkpoints: saving them costs more than these few tiny steps
        "train": {**TINY_TRAIN, "max_steps": 6, "save_every": 100, "checkpoint_dir": str(root / "ckpt")},
        "evaluate": {
            "general": None,  # the probe: tests/pipelines/test_pipeline.py
            "num_generate": 2,
            "max_new_tokens": 8,
            "gate": {"on_fail": "warn", "compare_with_stage": None, "min_eval_rows": 1},
        },
        "push": {"mode": "dry_run", "repo_id": "tests/tiny-sweep"},
        # learning rates far apart, so the points' eval losses differ clearly
        "sweep": {"grid": {"lora.r": [4, 8], "train.learning_rate": [1.0e-2]}},
    }
    return root, raw


def _run(raw):
    from pipelines import lora_pipeline

    return Client().get_pipeline_run(
        lora_pipeline.with_options(model=Model(name="tiny-sweep"))(config=validate_config(raw)).id
    )


def _point_losses(run, points):
    return {p: run.steps[f"evaluate_{p}"].outputs[f"sweep_eval_report_{p}"][0].load().tuned.loss for p in points}


def _check_selection(run, points):
    """select_best handed on the lowest-eval-loss point's adapter, report and settings, and tabled every point."""
    losses = _point_losses(run, points)
    best = min(points, key=losses.get)
    outputs = run.steps["select_best"].outputs
    table = outputs["sweep_table"][0].load()
    assert table.best == best and {r.point: r.eval_loss for r in table.rows} == pytest.approx(losses)
    assert outputs["sweep_table"][0].visualizations  # HTML in the dashboard
    assert outputs["eval_report"][0].load().tuned.loss == pytest.approx(losses[best])
    best_adapter = run.steps[f"train_{best}"].outputs[f"sweep_adapter_{best}"][0].load()
    chosen = outputs["adapter"][0].load()
    assert chosen.files() == best_adapter.files()
    for rel in ("adapter_config.json", "adapter_model.safetensors"):
        assert (chosen.path / rel).read_bytes() == (best_adapter.path / rel).read_bytes()
    lora = outputs["lora_settings"][0].load()
    assert f"r{lora.r}_" in best + "_"
    # merge and push ran on the chosen point, as in a single run; the card shows its settings. A cached merge
    # keeps the earlier run's input artifact, so compare content, not artifact ids.
    merged_from = run.steps["merge"].inputs["adapter"][0]
    assert merged_from.content_hash and merged_from.content_hash == outputs["adapter"][0].content_hash
    card = run.steps["push"].outputs["upload_bundle"][0].load().path.joinpath("README.md").read_text()
    assert f"| rank r | {lora.r} |" in card
    return best, losses


def test_sweep_picks_lowest_eval_loss_and_a_new_point_runs_alone(setup):
    _, raw = setup
    first = _run(raw)
    points = ["r4_lr0.01", "r8_lr0.01"]
    statuses = {name: s.status for name, s in first.steps.items()}
    assert set(statuses) == {*SHARED, "select_best", "merge", "push", "promote"} | {
        f"{kind}_{p}" for p in points for kind in ("train", "evaluate")
    }
    assert set(statuses.values()) == {ExecutionStatus.COMPLETED}
    best, _ = _check_selection(first, points)
    mv = Client().get_model_version("tiny-sweep", first.model_version.id)
    assert mv.run_metadata["sweep"]["best"] in points and "evaluation" in mv.run_metadata

    grown = {**raw, "sweep": {"grid": {"lora.r": [4, 8, 16], "train.learning_rate": [1.0e-2]}}}
    second = _run(grown)
    statuses = {name: s.status for name, s in second.steps.items()}
    for step in [*SHARED] + [f"{kind}_{p}" for p in points for kind in ("train", "evaluate")]:
        assert statuses[step] == ExecutionStatus.CACHED, step
    assert statuses["train_r16_lr0.01"] == statuses["evaluate_r16_lr0.01"] == ExecutionStatus.COMPLETED
    assert statuses["select_best"] == ExecutionStatus.COMPLETED
    new_best, _ = _check_selection(second, [*points, "r16_lr0.01"])
    # select_best's outputs are content-hashed: the same winner means merge and push hit the cache
    after = ExecutionStatus.CACHED if new_best == best else ExecutionStatus.COMPLETED
    assert (statuses["merge"], statuses["push"]) == (after, after)


def test_sweep_config_problems_are_all_reported():
    base = {"data": {"path": "d.jsonl"}}
    bad = {
        "lora.rank": [8],  # not sweepable
        "lora.r": [0, 8, 8],  # out of range, repeated
        "train.learning_rate": ["fast"],  # not a number
        "train.lr_scheduler": ["cosine", "exponential"],  # not a choice
    }
    with pytest.raises(ConfigError) as err:
        validate_config({**base, "sweep": {"grid": bad}})
    msg = str(err.value)
    assert "parameters.config.sweep" in msg and "5 problem(s) in the sweep" in msg
    for part in (
        "grid.lora.rank: not a setting a sweep can vary",
        "grid.lora.r[0] = 0: Input should be greater than or equal to 1",
        "grid.lora.r: repeated value(s) 8",
        "grid.train.learning_rate[0] = 'fast'",
        "grid.train.lr_scheduler[1] = 'exponential'",
    ):
        assert part in msg, part
    with pytest.raises(ConfigError, match="12 points, more than sweep.max_points=4"):
        validate_config(
            {**base, "sweep": {"grid": {"lora.r": [2, 4, 8], "lora.alpha": [8, 16, 32, 64]}, "max_points": 4}}
        )
    with pytest.raises(ConfigError, match="`tasks` and `sweep` do not combine"):
        validate_config({"tasks": [{"name": "a", "data": {"path": "x"}}], "sweep": {"grid": {"lora.r": [4]}}})

    # a YAML value like 5e-4 arrives as text: converted like the setting itself; ids from the typed values
    cfg = validate_config({**base, "sweep": {"grid": {"lora.r": [8, 16], "train.learning_rate": ["5e-4", 1.5e-3]}}})
    points = cfg.sweep_points()
    assert [p.id for p in points] == ["r8_lr0.0005", "r8_lr0.0015", "r16_lr0.0005", "r16_lr0.0015"]
    assert points[2].lora.r == 16 and points[2].train.learning_rate == 5e-4 and points[2].lora.alpha == cfg.lora.alpha
