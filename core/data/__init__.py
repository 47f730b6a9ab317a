"""Data: read into the canonical schema (ingest), check it (validation), tokenize and split it (formatting)."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.data.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
