"""Serving: the served model and request checks (model), the batch engine (batching), the OpenAI API (openai), the ZenML deployment glue (deployment)."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.serving.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
