"""Quiet third-party logging: the same library warnings on every run would drown the step logs."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """transformers/peft/datasets warnings repeat on every run; keep the step log readable."""
    import datasets

    datasets.disable_progress_bars()
    for name in ("transformers", "peft", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
