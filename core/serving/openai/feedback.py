"""What the feedback routes do, without HTTP: rate or correct a completion, list feedback for review, show the
request log's counters.

- `post_feedback` (POST /v1/feedback): the body is checked by protocol.py's FeedbackRequest (400 naming the param);
  a completion still waiting in the request log's buffer is written first, so fresh answers never 404; the feedback
  is committed before the answer (an acknowledged feedback survives a crash); one row per (completion_id, source).
  Unknown completion: 404 `completion_not_found`; database unreachable: 503 `database_unavailable`, Retry-After.
- `list_feedback` (GET /v1/feedback?since=&until=&version=&rating=&limit=): rows with their completions.
- `request_log_stats` (GET /v1/feedback/stats): pending, written, dropped, last_error (core/feedback/requestlog.py).

With `log_requests: false` there is nothing to rate: every feedback route answers 404 `feedback_disabled`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from core.serving.openai.errors import OpenAIError, invalid_request
from core.serving.openai.protocol import (
    CompletionRecord,
    FeedbackList,
    FeedbackQuery,
    FeedbackRecord,
    FeedbackRequest,
)

logger = logging.getLogger(__name__)


def request_log(served) -> Any:
    log = getattr(served, "request_log", None)
    if log is None:
        raise OpenAIError(
            404,
            "this deployment records no completions (log_requests: false): nothing to rate",
            code="feedback_disabled",
        )
    return log


def _unavailable(err: Exception) -> OpenAIError:
    logger.warning("feedback: database unavailable: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
    return OpenAIError(503, "the feedback database is unavailable; retry shortly", code="database_unavailable")


def _parse(model, body: Any):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise invalid_request(err) from None


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Naive times are UTC (SQLite hands them back without a zone; a query may give one without)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _record(feedback, completion=None) -> FeedbackRecord:
    columns = ("id", "completion_id", "source", "rating", "score", "correction", "comment")
    record = FeedbackRecord(
        **{c: getattr(feedback, c) for c in columns},
        created_at=_utc(feedback.created_at),
        updated_at=_utc(feedback.updated_at),
    )
    if completion is not None:
        fields = {name: getattr(completion, name) for name in CompletionRecord.model_fields}
        record.completion = CompletionRecord(**fields | {"created_at": _utc(completion.created_at)})
    return record


def _put(log, request: FeedbackRequest) -> FeedbackRecord:
    try:
        store = log.store()
        log.persist(request.completion_id)  # still in the buffer: written now, so the feedback has its completion
        row, _ = store.put_feedback(request.completion_id, request.source, **request.fields())
    except KeyError:
        raise OpenAIError(
            404, f"no completion '{request.completion_id}' in this deployment's request log", "completion_id",
            "completion_not_found",
        ) from None  # fmt: skip
    except (SQLAlchemyError, OSError) as err:
        raise _unavailable(err) from None
    return _record(row)


def _list(log, query: FeedbackQuery) -> FeedbackList:
    try:
        rows = log.store().feedback(_utc(query.since), _utc(query.until), query.version, query.rating, query.limit)
    except (SQLAlchemyError, OSError) as err:
        raise _unavailable(err) from None
    return FeedbackList(data=[_record(f, c) for f, c in rows])


async def post_feedback(served, body: Any) -> FeedbackRecord:
    """POST /v1/feedback: the stored row, committed; the database work off the event loop."""
    log = request_log(served)
    return await asyncio.to_thread(_put, log, _parse(FeedbackRequest, body))


async def list_feedback(served, params: dict[str, str]) -> FeedbackList:
    """GET /v1/feedback with the query string's filters."""
    log = request_log(served)
    return await asyncio.to_thread(_list, log, _parse(FeedbackQuery, params))


def request_log_stats(served) -> dict[str, Any]:
    """GET /v1/feedback/stats: the request log's counters."""
    return {"object": "request_log.stats", **request_log(served).stats()}
