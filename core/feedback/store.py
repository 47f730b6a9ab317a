"""The request log and its feedback, in a real database through SQLAlchemy: SQLite (WAL) next to the deployment by
default, PostgreSQL by URL for a deployment with several replicas. The schema is migrated by Alembic
(core/feedback/migrations) whenever a store opens, so an older database is brought up to date in place.

Two tables:
- `completions`: one row per answer the deployment returned, keyed by the id OpenAI clients receive
  (`chatcmpl-...`): model name, version and adapter, the messages (after redaction), the answer, sampling
  settings, token counts, latency, endpoint, whether it was streamed, and when.
- `feedback`: ratings (`up`/`down` or a 1-5 score), corrections and comments on a completion; one row per
  (completion, source), so sending the same feedback twice updates it instead of adding a second.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Completion(Base):
    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the OpenAI id the client received
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))  # chat.completions | invoke
    model: Mapped[str] = mapped_column(String(200))  # the ZenML model served
    version: Mapped[str] = mapped_column(String(64), index=True)  # its version number (as text) or stage
    adapter: Mapped[str] = mapped_column(String(200))  # the request's `model`: default, a task, base, merged
    messages: Mapped[list] = mapped_column(JSON)  # [{"role", "content"}], redacted before storage
    answer: Mapped[str] = mapped_column(Text)
    sampling: Mapped[dict] = mapped_column(JSON)  # temperature, top_p, max_tokens, stop, seed
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_s: Mapped[float] = mapped_column(Float)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("completion_id", "source", name="uq_feedback_completion_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(100), default="api")  # who rated: a reviewer tool, a user id, ...
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)  # up | down
    score: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)  # the answer it should have been
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL (readers never block the writer), a busy wait instead of 'database is locked', foreign keys on."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url` (sqlite:///path or postgresql+psycopg://...); SQLite gets WAL and foreign keys."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 5})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(url: str) -> None:
    """Bring the database at `url` to the newest schema (Alembic upgrade head)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


@dataclass
class FeedbackStore:
    """The database behind the request log and the feedback API; opened (and migrated) once per process."""

    url: str
    engine: Engine

    @classmethod
    def open(cls, url: str) -> FeedbackStore:
        migrate(url)
        return cls(url=url, engine=make_engine(url))

    def add_completions(self, rows: list[dict[str, Any]]) -> None:
        """Insert completion records (Completion's columns); one transaction for the batch."""
        with Session(self.engine) as session, session.begin():
            session.add_all(Completion(**row) for row in rows)

    def completion(self, completion_id: str) -> Completion | None:
        with Session(self.engine) as session:
            return session.get(Completion, completion_id)

    def put_feedback(self, completion_id: str, source: str, **fields: Any) -> tuple[Feedback, bool]:
        """Record feedback on a completion, one row per (completion, source): a repeat updates it. Returns (the
        row, whether it was new). KeyError when the completion is unknown."""
        now = utcnow()
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if session.get(Completion, completion_id) is None:
                raise KeyError(completion_id)
            row = session.scalar(
                select(Feedback).where(Feedback.completion_id == completion_id, Feedback.source == source)
            )
            created = row is None
            if created:
                row = Feedback(completion_id=completion_id, source=source, created_at=now)
                session.add(row)
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = now
        return row, created

    def feedback(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        version: str | None = None,
        rating: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[Feedback, Completion]]:
        """Feedback rows with their completions, oldest first, filtered by time, served version and rating."""
        query = select(Feedback, Completion).join(Completion, Feedback.completion_id == Completion.id)
        if since is not None:
            query = query.where(Feedback.updated_at >= since)
        if until is not None:
            query = query.where(Feedback.updated_at < until)
        if version is not None:
            query = query.where(Completion.version == version)
        if rating is not None:
            query = query.where(Feedback.rating == rating)
        query = query.order_by(Feedback.updated_at, Feedback.id)
        if limit is not None:
            query = query.limit(limit)
        with Session(self.engine, expire_on_commit=False) as session:
            return [(f, c) for f, c in session.execute(query).all()]
