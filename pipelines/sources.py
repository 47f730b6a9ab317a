"""Data sources' fingerprints as a run compiles them. A feedback source's `since: last_version` is resolved here for
this run's ZenML model (the newest staged version's creation time, core/data/feedback.py), so the ingest cache key
changes with the window and with new feedback; ingest resolves it again when it runs, because a schedule replays
one compiled snapshot and its window must move on with every promotion."""

from __future__ import annotations

from core.config import DataSource
from core.data.feedback import resolve_since
from core.data.ingest import source_fingerprint


def fingerprint(data: DataSource) -> str:
    """source_fingerprint, with a feedback source's window resolved for this run's model."""
    if data.source == "feedback":
        from zenml import get_pipeline_context

        model = get_pipeline_context().model
        data = resolve_since(data, model.name if model is not None else None)
    return source_fingerprint(data)
