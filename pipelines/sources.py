"""Data sources as a run compiles them: a feedback source's `since: last_version` becomes the creation time of the
newest staged version of this run's ZenML model (core/data/feedback.py), so the step parameters, the fingerprint
and the run's metadata all name the window it reads."""

from __future__ import annotations

from core.config import DataSource
from core.data.feedback import resolve_since


def compiled(data: DataSource) -> DataSource:
    """`data` with its feedback window resolved for this run's model; any other source as it is."""
    if data.source != "feedback":
        return data
    from zenml import get_pipeline_context

    model = get_pipeline_context().model
    return resolve_since(data, model.name if model is not None else None)
