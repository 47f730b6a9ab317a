"""ZenML run bookkeeping: model versions (registry), MLflow (tracking), cache policies (caching), stack checks (preflight), sweep and multitask summaries (sweep, tasks)."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.runs.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
