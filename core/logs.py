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
