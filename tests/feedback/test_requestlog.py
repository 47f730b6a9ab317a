"""The request log's buffer: records wait while the database is unreachable and are written when it is back; beyond
the bound the oldest are dropped and counted; a waiting completion is written at once when feedback names it;
retention deletes old completions."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from core.feedback.config import RequestLogConfig
from core.feedback.requestlog import RequestLog, purge_older_than
from core.feedback.store import FeedbackStore, sqlite_url, utcnow


def row(i: int, **extra) -> dict:
    return dict(
        id=f"chatcmpl-{i}", created_at=utcnow(), endpoint="chat.completions", model="m", version="1",
        adapter="default", messages=[{"role": "user", "content": f"q{i} from me@example.com"}], answer=f"a{i}",
        sampling={}, prompt_tokens=3, completion_tokens=2, latency_s=0.1, stream=False,
    ) | extra  # fmt: skip


def wait_for(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def down_url(tmp_path):
    """A SQLite file in a folder that does not exist yet: unreachable until the test creates the folder."""
    return tmp_path / "later", sqlite_url(tmp_path / "later" / "log.db")


def test_records_are_written_redacted(tmp_path):
    log = RequestLog(sqlite_url(tmp_path / "log.db"))
    try:
        for i in range(3):
            log.record(row(i))
        wait_for(lambda: log.stats()["written"] == 3)
        got = log.store().completion("chatcmpl-1")
        assert got.messages == [{"role": "user", "content": "q1 from [email]"}] and got.answer == "a1"
        assert log.stats() | {"database": None} == {
            "pending": 0, "written": 3, "dropped": 0, "last_error": None, "buffer_size": 10000, "database": None,
        }  # fmt: skip
    finally:
        log.close()


def test_database_down_then_back_loses_nothing_within_the_buffer(down_url):
    folder, url = down_url
    log = RequestLog(url, RequestLogConfig(buffer_size=5), retry_min_s=0.05)
    try:
        for i in range(4):
            log.record(row(i))  # returns at once although nothing can be written
        wait_for(lambda: log.stats()["last_error"] is not None)
        assert log.stats()["pending"] == 4 and log.stats()["written"] == 0
        with pytest.raises(Exception, match="unable to open database"):
            log.persist("chatcmpl-2")  # feedback meanwhile: 503 upstream; the row stays waiting
        assert log.stats()["pending"] == 4
        folder.mkdir()  # the database is back
        wait_for(lambda: log.stats()["written"] == 4)
        assert log.stats()["last_error"] is None and log.stats()["dropped"] == 0
        assert [log.store().completion(f"chatcmpl-{i}") is not None for i in range(4)] == [True] * 4
    finally:
        log.close()


def test_beyond_the_bound_the_oldest_are_dropped_and_counted(down_url, caplog):
    folder, url = down_url
    log = RequestLog(url, RequestLogConfig(buffer_size=3), retry_min_s=0.05)
    try:
        for i in range(5):
            log.record(row(i))
        assert log.stats()["dropped"] == 2 and log.stats()["pending"] == 3
        assert "2 oldest dropped so far" in caplog.text
        folder.mkdir()
        wait_for(lambda: log.stats()["written"] == 3)
        store = log.store()
        assert [store.completion(f"chatcmpl-{i}") is not None for i in range(5)] == [False, False, True, True, True]
    finally:
        log.close()


def test_persist_writes_a_waiting_completion_now(tmp_path):
    gate = threading.Event()

    class HeldWriter(RequestLog):  # the writer thread is held up: rows stay in the buffer
        def _write_batch(self):
            gate.wait(20)
            super()._write_batch()

    log = HeldWriter(sqlite_url(tmp_path / "log.db"))
    try:
        log.record(row(1))
        log.record(row(2))
        assert log.stats()["pending"] == 2
        assert log.persist("chatcmpl-2") and log.store().completion("chatcmpl-2") is not None
        assert log.stats()["pending"] == 1 and not log.persist("chatcmpl-404")
        gate.set()
        wait_for(lambda: log.stats()["written"] == 2)
    finally:
        gate.set()
        log.close()


def test_close_flushes_and_retention_deletes_old_completions_with_their_feedback(tmp_path):
    url = sqlite_url(tmp_path / "log.db")
    log = RequestLog(url)
    old = utcnow() - dt.timedelta(days=40)
    log.record(row(1, created_at=old))
    log.record(row(2))
    log.close()
    store = FeedbackStore.open(url)
    assert store.completion("chatcmpl-1") is not None and store.completion("chatcmpl-2") is not None
    store.put_feedback("chatcmpl-1", "api", rating="up")
    assert purge_older_than(store, 30) == 1
    assert store.completion("chatcmpl-1") is None and store.completion("chatcmpl-2") is not None
    assert store.feedback() == []
    # and a log opened with retention applies it at start
    store.add_completions([row(3, created_at=old)])
    log = RequestLog(url, RequestLogConfig(retention_days=30))
    try:
        wait_for(lambda: store.completion("chatcmpl-3") is None)
    finally:
        log.close()
