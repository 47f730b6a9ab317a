"""The request log's settings: ServeConfig's `request_log` section (configs/serve.yaml, docs/serving.md)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from core.config import StrictModel


class RequestLogConfig(StrictModel):
    """Where served completions are recorded, what is redacted before they are, and how long they are kept."""

    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the log database: sqlite:///path (WAL) for one server, "
        "postgresql+psycopg://user:pass@host/db for several replicas sharing one log. None: a SQLite file "
        "feedback/<model_name>.db under ZenML's local stores path, next to the deployment's other state.",
    )
    redact_emails: bool = Field(True, description="Replace e-mail addresses with [email] before storage.")
    redact_card_numbers: bool = Field(
        True,
        description="Replace card-like numbers (13-19 digits, spaces or dashes allowed, Luhn-valid) with [card].",
    )
    redact_patterns: list[str] = Field(
        default_factory=list,
        description="Python regular expressions whose matches are replaced with [redacted] (e.g. order or "
        "account numbers); checked when the config loads.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Completions older than this (and their feedback) are deleted at start and every hour; "
        "None: kept forever.",
    )
    buffer_size: int = Field(
        10000,
        ge=1,
        description="Records waiting for the database at most; beyond it the oldest are dropped (counted, logged, "
        "and shown by GET /v1/feedback/stats).",
    )

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"redact_patterns[{i}] {pattern!r} is not a valid regular expression: {err}") from None
        return patterns
