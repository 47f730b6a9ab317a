"""Merging an adapter into fp16 weights: peft's or the streamed, planned merge (adapter, stream)."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.merge.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
