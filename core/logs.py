"""Quiet third-party logging: the same library warnings on every run would drown the step logs."""

from __future__ import annotations

import logging
import re
import warnings

# Deprecation notices for calls made inside peft/trl, not by this project's code: one per run, nothing to act on.
LIBRARY_NOTICES = (
    r"`gradient_checkpointing_enable` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)


def quiet_libraries() -> None:
    """transformers/peft/datasets warnings repeat on every run; keep the step log readable."""
    import datasets

    datasets.disable_progress_bars()
    for name in ("transformers", "peft", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for notice in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=FutureWarning)


MASK = "***"


def mask_secrets(text: str, *secrets: str | None) -> str:
    """`text` with every occurrence of each secret replaced by ***. Values under 4 characters are left alone:
    masking every "a" or "1" in a message would hide what it says and still leak a secret that short."""
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    return text


def exception_chain(exc: BaseException | None):
    """`exc`, then its __cause__ (else __context__), and so on; each exception once (a chain can loop)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def project_error(exc: BaseException | None) -> BaseException | None:
    """The first error raised by this project's own code (an exception class defined under core/) in the chain
    of `exc` (itself, then its __cause__ / __context__), or None."""
    return next((e for e in exception_chain(exc) if type(e).__module__.split(".")[0] == "core"), None)


FAILED_RUN = re.compile(r"Pipeline run has failed due to failure in step\(s\): (.+)$")


def failed_step_errors(exc: BaseException) -> list[tuple[str, str, str]] | None:
    """For ZenML's "Pipeline run has failed due to failure in step(s): ..." error: (step, error class, message)
    of each failed step of the newest run, when every one of them failed on a project error; else None."""
    found = FAILED_RUN.search(str(exc))
    if not isinstance(exc, RuntimeError) or not found:
        return None
    names = [n.strip() for n in found.group(1).split(",")]
    try:
        from zenml.client import Client

        run = Client().list_pipeline_runs(sort_by="desc:created", size=1, hydrate=True).items[0]
        infos = [(name, run.steps[name].exception_info) for name in names]
    except Exception:  # no store, no such run or step: keep the traceback
        return None
    if not all(info and (info.source or "").startswith("core.") for _, info in infos):
        return None
    return [(name, info.source.rsplit(".", 1)[-1], info.message or "") for name, info in infos]


class _OwnErrorsWithoutTraceback(logging.Filter):
    """ZenML logs a failed step's traceback ("Step validate failed."); for our own errors the message says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and project_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def install_error_hook(stream=None) -> None:
    """A run that stops on one of the project's own errors (bad data, a failed gate, a config mistake) ends with
    that error's message, not a 60-line traceback: its text already says what and where, and the full traceback
    stays in the failed step's logs. Other errors keep the traceback. Installed when pipelines/ is imported."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "_project_hook", False):
        return

    def hook(kind, value, tb):
        ours = project_error(value)
        errors = [("", type(ours).__name__, str(ours))] if ours is not None else failed_step_errors(value)
        if not errors:
            return previous(kind, value, tb)
        out = stream or sys.stderr
        for step, name, message in errors:
            print(f"\nerror{f' in step {step}' if step else ''}: {name}: {message}", file=out)
        if getattr(ours, "before_run", False):  # e.g. core.runs.preflight's checks: raised while the run was compiled
            print("(raised on this machine before the run started: no step ran)", file=out)
        else:
            print("(the full traceback is in the failed step's logs, shown in the dashboard)", file=out)

    hook._project_hook = True
    sys.excepthook = hook
    for name in ("zenml.orchestrators.local.local_orchestrator", "zenml.orchestrators.step_launcher"):
        logging.getLogger(name).addFilter(_OwnErrorsWithoutTraceback())
