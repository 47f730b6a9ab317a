"""ZenML steps: one thin, typed @step per file, named by its verb, over the library in core/."""

from core import lazy_submodule


def __getattr__(name: str):  # `steps.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
