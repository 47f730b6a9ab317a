"""Step 2, validate: Great Expectations checks on the canonical dataset (core/data/validation.py)."""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step

import materializers  # noqa: F401  (registers the dataset and report materializers)
from core.artifact_names import CLEAN_DATASET, VALIDATION_REPORT
from core.config import ValidationConfig
from core.data.validation import ValidationReport, validate_dataset
from core.runs.caching import step_cache_policy


@step(cache_policy=step_cache_policy(__name__))
def validate(
    raw_dataset: Dataset, validation: ValidationConfig
) -> tuple[Annotated[Dataset, CLEAN_DATASET], Annotated[ValidationReport, VALIDATION_REPORT]]:
    """Fail, or drop offending rows, per `validation.policy`; the report lists every expectation."""
    clean, report = validate_dataset(raw_dataset, validation)
    log_metadata(
        metadata={
            "rows_in": report.rows_in,
            "rows_out": report.rows_out,
            "rows_dropped": report.rows_in - report.rows_out,
            "failed_expectations": [f"{r.expectation}({r.column})" for r in report.failed],
        }
    )
    return clean, report
