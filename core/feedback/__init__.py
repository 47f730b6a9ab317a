"""The feedback loop: served answers logged (requestlog.py, redaction.py), rated and corrected (store.py), and traced
to the versions that learned from them (trace.py); core/data/feedback.py turns the store into training data."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.feedback.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
