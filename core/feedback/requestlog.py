"""The request log's writer: completions are recorded without ever blocking or failing the answer they describe.

`RequestLog.record(row)` puts a completion row (core/feedback/store.py's Completion columns), redacted, on a bounded
buffer and returns; a background thread writes the buffer to the database in batches. When the database is
unreachable (or not even openable yet) the rows wait and the writer retries with backoff (0.5 s doubling to 30 s);
they are written when it comes back. Beyond `buffer_size` waiting rows the OLDEST are dropped: a client that rates
an answer does so soon after getting it, so the newest rows are the ones feedback will still name. Drops are
counted, logged with the count, and shown by `stats()` (GET /v1/feedback/stats).

Feedback for a completion still waiting in the buffer first writes that completion (`persist`), so it never 404s.
Retention: completions older than `retention_days` (their feedback with them) are deleted at start and hourly.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy import delete, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.feedback.config import RequestLogConfig
from core.feedback.redaction import Redactor
from core.feedback.store import Completion, FeedbackStore, sqlite_url, utcnow

logger = logging.getLogger(__name__)

BATCH = 500  # rows per transaction: one commit per batch, not per completion
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0
RETENTION_EVERY_S = 3600.0
LINGER_S = 0.2  # the writer waits this long for more rows after the first: one commit for many under load


def default_url(model_name: str) -> str:
    """SQLite under ZenML's local stores path (the deployment's own state lives there too)."""
    from zenml.config.global_config import GlobalConfiguration

    folder = Path(GlobalConfiguration().local_stores_path) / "feedback"
    folder.mkdir(parents=True, exist_ok=True)
    return sqlite_url(folder / f"{model_name}.db")


def purge_older_than(store: FeedbackStore, days: float) -> int:
    """Delete completions older than `days` (their feedback goes by the foreign key's cascade); how many."""
    cutoff = utcnow() - dt.timedelta(days=days)
    with Session(store.engine) as session, session.begin():
        return session.execute(delete(Completion).where(Completion.created_at < cutoff)).rowcount or 0


class RequestLog:
    """A bounded buffer of completion rows and the thread that writes them; see the module docstring."""

    def __init__(self, url: str, cfg: RequestLogConfig | None = None, retry_min_s: float = RETRY_MIN_S):
        self.url, self.cfg = url, cfg or RequestLogConfig()
        self.redact = Redactor.from_config(self.cfg)
        self._pending: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()  # guards _pending and the counters
        self._wake = threading.Condition(self._lock)
        self._writing = threading.Lock()  # one writer of completions at a time: the thread or persist()
        self._opening = threading.Lock()
        self._store: FeedbackStore | None = None
        self._retry_min_s = retry_min_s
        self._stopping = False
        self._stopped = threading.Event()  # wakes the writer out of its backoff (records must not)
        self.written = self.dropped = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    # -- the serving side: never blocks on the database, never raises ----------------------------------------------

    def record(self, row: dict[str, Any]) -> None:
        try:
            row = {**row, "messages": self.redact.messages(row["messages"]), "answer": self.redact(row["answer"])}
            with self._lock:
                self._pending.append(row)
                dropped = self._trim()
                self._wake.notify()
            if dropped and self.dropped & (self.dropped - 1) == 0:  # at 1, 2, 4, 8, ... drops: counted, not flooded
                logger.warning(
                    "request log: buffer full (%d rows), the database is behind: %d oldest dropped so far",
                    self.cfg.buffer_size,
                    self.dropped,
                )
        except Exception:  # a log that cannot record must not cost the answer
            logger.exception("request log: could not record a completion")

    def _trim(self) -> int:
        """Drop the oldest rows beyond buffer_size (lock held); how many now."""
        over = max(0, len(self._pending) - self.cfg.buffer_size)
        for _ in range(over):
            self._pending.popleft()
        self.dropped += over
        return over

    # -- the feedback side ------------------------------------------------------------------------------------------

    def store(self) -> FeedbackStore:
        """The database, opened (and migrated) on first success; raises while it is unreachable."""
        with self._opening:
            if self._store is None:
                self._store = FeedbackStore.open(self.url)
                if self.cfg.retention_days is not None:
                    self._purge()
            return self._store

    def persist(self, completion_id: str) -> bool:
        """Write the completion now if it is still waiting in the buffer (feedback names it); whether it was."""
        with self._writing:
            with self._lock:
                row = next((r for r in self._pending if r["id"] == completion_id), None)
                if row is None:
                    return False
                self._pending.remove(row)
            try:
                self._add([row])
            except Exception:
                with self._lock:
                    self._pending.appendleft(row)
                raise
            return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pending": len(self._pending),
                "written": self.written,
                "dropped": self.dropped,
                "last_error": self.last_error,
                "buffer_size": self.cfg.buffer_size,
                "database": make_url(self.url).render_as_string(hide_password=True),
            }

    def close(self, timeout: float = 10.0) -> None:
        """Write what is waiting (up to `timeout` s), then stop the writer; rows still waiting then are lost (logged)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._stopped.set()
        self._thread.join(timeout)
        left = len(self._pending)
        if left:
            logger.warning("request log: %d completions not written at shutdown (database: %s)", left, self.last_error)
        if self._store is not None:
            self._store.engine.dispose()

    # -- the writer thread ------------------------------------------------------------------------------------------

    def _add(self, rows: list[dict[str, Any]]) -> None:
        store = self.store()
        try:
            store.add_completions(rows)
        except IntegrityError:  # a batch whose commit went through before its error reached us: skip what is there
            for row in rows:
                try:
                    store.add_completions([row])
                except IntegrityError:
                    continue
        with self._lock:
            self.written += len(rows)
            self.last_error = None

    def _write_batch(self) -> None:
        with self._writing:
            with self._lock:
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            try:
                self._add(batch)
            except Exception:
                with self._lock:  # back at the front, in order; newer rows may have come meanwhile
                    self._pending.extendleft(reversed(batch))
                    self._trim()
                raise

    def _purge(self) -> None:
        gone = purge_older_than(self._store, self.cfg.retention_days)
        if gone:
            logger.info("request log: %d completions older than %s days deleted", gone, self.cfg.retention_days)

    def _run(self) -> None:
        backoff = self._retry_min_s
        next_purge = time.monotonic()  # open, migrate and apply retention at start
        while True:
            with self._lock:
                if not self._pending and not self._stopping:
                    self._wake.wait(timeout=max(0.0, next_purge - time.monotonic()))
                if self._stopping and not self._pending:
                    return
                work = bool(self._pending)
            try:
                if work:
                    if len(self._pending) < BATCH:
                        self._stopped.wait(LINGER_S)  # closing: no lingering
                    self._write_batch()
                if time.monotonic() >= next_purge:
                    if self._store is None:
                        self.store()  # opening migrates and purges
                    elif self.cfg.retention_days is not None:
                        self._purge()
                    next_purge = time.monotonic() + RETENTION_EVERY_S
                backoff = self._retry_min_s
            except Exception as err:
                message = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                with self._lock:
                    first = self.last_error is None
                    self.last_error = message
                    pending = len(self._pending)
                if first:
                    logger.warning("request log: database unavailable (%s); %d completions wait", message, pending)
                if self._stopped.wait(timeout=backoff):  # closing during an outage: close() reports what is left
                    return
                backoff = min(backoff * 2, RETRY_MAX_S)
