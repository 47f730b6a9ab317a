"""Scheduled runs: what ZenML's local orchestrator does with a schedule, and the check `make schedule` runs first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cli.schedule import ScheduleError, check_schedulable, main

REPO = Path(__file__).resolve().parents[2]
WEEKLY = REPO / "configs" / "schedule_weekly.yaml"
FEEDBACK = REPO / "configs" / "schedule_retrain_from_feedback.yaml"


def _orchestrator(flavor: str, schedulable: bool):
    return SimpleNamespace(name=f"my-{flavor}", flavor=flavor, config=SimpleNamespace(is_schedulable=schedulable))


def test_zenml_local_orchestrator_refuses_a_schedule_without_naming_an_alternative(zenml_home):
    """Why the check exists: ZenML 0.98 compiles the whole pipeline, then raises this."""
    from zenml.client import Client

    from pipelines.lora_pipeline import lora_pipeline

    client = Client()
    assert not client.active_stack.orchestrator.config.is_schedulable
    made = None
    try:  # the config lists this secret; without it ZenML stops even earlier, with a KeyError
        client.get_secret("huggingface")
    except KeyError:
        made = client.create_secret("huggingface", values={"token": "x", "HF_TOKEN": "x"})
    try:
        with pytest.raises(ValueError, match="does not support scheduling") as err:
            lora_pipeline.with_options(config_path=str(WEEKLY))()
    finally:
        if made:
            client.delete_secret(made.id)
    assert "cron" not in str(err.value)


def test_check_names_the_cron_alternative_on_the_local_stack(zenml_home, capsys):
    with pytest.raises(ScheduleError) as err:
        check_schedulable(WEEKLY)  # the active (default, local) stack
    msg = str(err.value)
    assert "cannot run schedules" in msg and "'default' (local)" in msg
    assert f"0 3 * * 1 cd {REPO} && mkdir -p .cache && make run CONFIG=configs/default.yaml" in msg
    assert "zenml stack set k8s-gpu" in msg
    # `make schedule` / python -m cli.schedule: exit status 2, the message on stderr, nothing submitted
    assert main(["--check", str(WEEKLY)]) == 2
    assert "crontab -e" in capsys.readouterr().err


def test_check_passes_the_weekly_config_on_kubernetes():
    schedule = check_schedulable(WEEKLY, orchestrator=_orchestrator("kubernetes", True))
    assert schedule["cron_expression"] == "0 3 * * 1"


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.pop("schedule"), "no `schedule:` block"),
        (lambda d: d["schedule"].pop("cron_expression") and d["schedule"].update(interval_second=3600), "CronJobs"),
        (lambda d: d["steps"].pop("ingest"), "enable_cache: false"),
        (lambda d: d["steps"]["ingest"].update(enable_cache=True), "frozen"),
    ],
    ids=["no-schedule", "interval-on-kubernetes", "ingest-cached", "ingest-cache-true"],
)
def test_check_catches_schedules_that_would_fail_late_or_silently(tmp_path, edit, problem):
    doc = yaml.safe_load(WEEKLY.read_text())
    edit(doc)
    path = tmp_path / "weekly.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ScheduleError, match=problem):
        check_schedulable(path, orchestrator=_orchestrator("kubernetes", True))


def test_the_feedback_retrain_schedule_passes_and_its_feedback_ingest_must_rerun(tmp_path):
    assert check_schedulable(FEEDBACK, orchestrator=_orchestrator("kubernetes", True))["cron_expression"]
    doc = yaml.safe_load(FEEDBACK.read_text())
    doc["steps"].pop("ingest_mix_feedback")
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ScheduleError, match="`steps: ingest_mix_feedback: enable_cache: false`"):
        check_schedulable(path, orchestrator=_orchestrator("kubernetes", True))
    # where the stack cannot schedule, the cron line runs the plain retrain config
    with pytest.raises(ScheduleError, match="make run CONFIG=configs/retrain_from_feedback.yaml"):
        check_schedulable(FEEDBACK, orchestrator=_orchestrator("local", False))
