"""The feedback store: Alembic-migrated SQLite (WAL), completions, idempotent feedback, filters."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest

from core.feedback.store import FeedbackStore, sqlite_url, utcnow


def completion(i: int, version: str = "3", **extra) -> dict:
    return dict(
        id=f"chatcmpl-{i}", created_at=utcnow(), endpoint="chat.completions", model="m", version=version,
        adapter="default", messages=[{"role": "user", "content": f"q{i}"}], answer=f"a{i}", sampling={"seed": i},
        prompt_tokens=3, completion_tokens=2, latency_s=0.1, stream=False,
    ) | extra  # fmt: skip


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    return FeedbackStore.open(sqlite_url(tmp_path / "log.db"))


def test_the_schema_is_migrated_and_the_journal_is_wal(store, tmp_path):
    with sqlite3.connect(tmp_path / "log.db") as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        assert {"completions", "feedback", "alembic_version"} <= tables
        assert db.execute("select version_num from alembic_version").fetchone() == ("0001",)
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
    FeedbackStore.open(store.url)  # opening again migrates nothing and loses nothing


def test_feedback_is_one_row_per_completion_and_source(store):
    store.add_completions([completion(1), completion(2)])
    row, created = store.put_feedback("chatcmpl-1", "api", rating="down", correction="Better.")
    assert created and row.correction == "Better."
    row, created = store.put_feedback("chatcmpl-1", "api", rating="down", correction="Better still.")
    assert not created and row.correction == "Better still."
    store.put_feedback("chatcmpl-1", "reviewer", score=4)
    got = [(f.source, f.rating, f.score, f.correction, c.answer) for f, c in store.feedback()]
    assert got == [("api", "down", None, "Better still.", "a1"), ("reviewer", None, 4, None, "a1")]
    with pytest.raises(KeyError):
        store.put_feedback("chatcmpl-404", "api", rating="up")


def test_feedback_filters_by_time_version_and_rating(store):
    store.add_completions([completion(1, "3"), completion(2, "4")])
    store.put_feedback("chatcmpl-1", "api", rating="up")
    cut = utcnow() + dt.timedelta(microseconds=1)
    store.put_feedback("chatcmpl-2", "api", rating="down")
    assert [c.id for _, c in store.feedback(version="4")] == ["chatcmpl-2"]
    assert [c.id for _, c in store.feedback(rating="up")] == ["chatcmpl-1"]
    assert [c.id for _, c in store.feedback(since=cut)] == ["chatcmpl-2"]
    assert [c.id for _, c in store.feedback(until=cut)] == ["chatcmpl-1"]
