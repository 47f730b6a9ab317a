"""Quiet third-party logging: the same library warnings on every run would drown the step logs."""

from __future__ import annotations

import logging
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


def project_error(exc: BaseException | None) -> BaseException | None:
    """The first error raised by this project's own code (an exception class defined under core/) in the chain
    of `exc` (itself, then its __cause__ / __context__), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.split(".")[0] == "core":
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


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
        if ours is None:
            return previous(kind, value, tb)
        out = stream or sys.stderr
        print(f"\nerror: {type(ours).__name__}: {ours}", file=out)
        print("(full traceback: the failed step's logs, `zenml pipeline runs list` and the dashboard)", file=out)

    hook._project_hook = True
    sys.excepthook = hook
