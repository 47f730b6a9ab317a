"""Submit a scheduled run config (e.g. configs/schedule_weekly.yaml), after checking the active stack can schedule it.

    python -m cli.schedule configs/schedule_weekly.yaml      # what `make schedule` runs
    python -m cli.schedule --check configs/schedule_weekly.yaml

ZenML 0.98's local orchestrator cannot schedule. `zenml pipeline run -c` with a `schedule:` block
on the default stack compiles the whole pipeline first, then stops with a traceback ending in
"ValueError: Stack default does not support scheduling ..." and a docs link (or, before that, a
KeyError when the config's ZenML secrets do not exist locally). Neither says what to do instead.
This check runs first and says it: on a stack that cannot schedule, the alternative is the
system's cron calling `make run` (a plain run, compiled afresh each time) with the same cron
expression. It also catches the two scheduled-run mistakes that fail late or silently: a schedule
without a cron expression on Kubernetes (a CronJob needs one), and a cached ingest step, the task
data's or a feedback source's (the CronJob replays one compiled snapshot, so the data fingerprint
ingest is keyed by never changes).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


class ScheduleError(RuntimeError):
    """The config cannot be scheduled on the active stack; the message says what to do instead."""


def cron_alternative(cron: str, run_config: str = "configs/default.yaml") -> str:
    """A crontab line that runs the pipeline on this machine at the same times."""
    log = ".cache/scheduled-runs.log"
    return f"{cron} cd {shlex.quote(str(REPO_ROOT))} && mkdir -p .cache && make run CONFIG={run_config} >> {log} 2>&1"


def check_schedulable(config_path: str | Path, orchestrator=None) -> dict:
    """Raise ScheduleError unless the config has a schedule the active stack's orchestrator can run.

    Returns the config's `schedule:` block. `orchestrator` defaults to the active stack's.
    """
    path = Path(config_path)
    doc = yaml.safe_load(path.read_text()) or {}
    schedule = doc.get("schedule")
    if not schedule:
        raise ScheduleError(f"{path}: no `schedule:` block; for a one-off run use `make run CONFIG={path}`")
    cron = schedule.get("cron_expression")
    if orchestrator is None:
        from zenml.client import Client

        orchestrator = Client().active_stack.orchestrator
    if not orchestrator.config.is_schedulable:
        raise ScheduleError(
            f"The active stack's orchestrator '{orchestrator.name}' ({orchestrator.flavor}) cannot run schedules, "
            f"so ZenML would refuse {path}.\n"
            "Either switch to a stack whose orchestrator schedules (Kubernetes: `zenml stack set k8s-gpu`, "
            "see infra/README.md), or let this machine's cron start plain runs. `crontab -e`, then add:\n\n"
            f"  {cron_alternative(cron or '0 3 * * 1', plain_config(doc))}\n\n"
            "with CONFIG= a config without a `schedule:` block (configs/default.yaml, or a copy of this one "
            "without it). Each cron run compiles afresh, so the data fingerprint is current and ingest may cache."
        )
    if orchestrator.flavor == "kubernetes" and not cron:
        raise ScheduleError(
            f"{path}: the Kubernetes orchestrator schedules with CronJobs and needs `schedule.cron_expression` "
            "(interval_second / run_once_start_time are not supported there)"
        )
    steps = doc.get("steps") or {}
    cached = [s for s in fresh_ingest_steps(doc) if (steps.get(s) or {}).get("enable_cache") is not False]
    if cached:
        keys = ", ".join(f"`steps: {s}: enable_cache: false`" for s in cached)
        raise ScheduleError(
            f"{path}: set {keys}. A schedule replays one compiled snapshot, so the data fingerprint that keys "
            "ingest's cache is frozen and a cached ingest would never read new data."
        )
    return schedule


def plain_config(doc: dict) -> str:
    """The shipped config without a `schedule:` block that does what a scheduled one does (for the cron line)."""
    return "configs/retrain_from_feedback.yaml" if len(fresh_ingest_steps(doc)) > 1 else "configs/default.yaml"


def fresh_ingest_steps(doc: dict) -> list[str]:
    """The ingest steps a scheduled run must re-run: the task data's, and every feedback source's (new feedback
    arrives between runs; pipelines/single_run.py and pipelines/preference.py name these steps)."""
    config = (doc.get("parameters") or {}).get("config") or {}
    data = config.get("data") or {}
    steps = ["ingest"]
    steps += [f"ingest_mix_{m.get('name')}" for m in data.get("mix") or [] if m.get("source") == "feedback"]
    preference = (config.get("train") or {}).get("preference") or {}
    if (preference.get("data") or {}).get("source") == "feedback":
        steps.append("ingest_preference")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a run config with a `schedule:` block")
    parser.add_argument("--check", action="store_true", help="only check; submit nothing")
    args = parser.parse_args(argv)
    try:
        schedule = check_schedulable(args.config)
    except ScheduleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: schedule {schedule.get('cron_expression')!r} can run on the active stack")
    if args.check:
        return 0
    from pipelines.lora_pipeline import lora_pipeline

    # What `zenml pipeline run pipelines.lora_pipeline -c CONFIG` does.
    lora_pipeline.with_options(config_path=args.config)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
