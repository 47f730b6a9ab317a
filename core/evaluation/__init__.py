"""Evaluation: scoring a trained adapter against its base (scoring), the quality and forgetting gate (gate)."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.evaluation.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
