"""The OpenAI-compatible API: its shapes (protocol), errors (errors), the work of each route (service), routes."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.serving.openai.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
