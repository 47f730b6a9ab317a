"""The request log and feedback on a real PostgreSQL server the test starts: Debian's `initdb` in a temp folder,
listening on 127.0.0.1 only (its unix socket in the same folder), stopped by the test. The Alembic migration, the
writer thread, idempotent feedback, filters, retention, and a server that goes down and comes back (the records
wait, then are written); and the `source: feedback` data source (core/data/feedback.py) reading that store.

Needs psycopg (`make feedback-setup`, the `feedback` extra) and Debian's postgresql binaries; skipped without them.
As root (CI containers) the server runs as the `postgres` user: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from core.config import DataSource, ValidationConfig
from core.data.feedback import row_versions
from core.data.ingest import load_rows
from core.data.validation import validate_dataset
from core.feedback.config import RequestLogConfig
from core.feedback.requestlog import RequestLog, purge_older_than
from core.feedback.store import FeedbackStore, utcnow
from core.serving.llamacpp_engine import free_port

pytest.importorskip("psycopg", reason="psycopg not installed: make feedback-setup (the `feedback` extra)")


def pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


INITDB, PG_CTL = pg_bin("initdb"), pg_bin("pg_ctl")
AS_ROOT = os.geteuid() == 0


def as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if AS_ROOT else []


class Postgres:
    """One throwaway PostgreSQL server: its data, socket and log in one temp folder; trust auth on 127.0.0.1."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pg-feedback-"))  # not under pytest's 0700 root-only tmp
        self.data, self.port = self.dir / "data", free_port()
        if AS_ROOT:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(INITDB, "-D", str(self.data), "-U", "test", "--auth=trust", "-E", "UTF8")
        self.url = f"postgresql+psycopg://test@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*as_server_user(), *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir}"  # loopback only; the socket in our folder
        self._run(PG_CTL, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(PG_CTL, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*as_server_user(), PG_CTL, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres():
    if not (INITDB and PG_CTL):
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    if AS_ROOT and (
        shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode
    ):
        pytest.skip("running as root without a `postgres` user to run the server as")
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def row(i: int, **extra) -> dict:
    return dict(
        id=f"chatcmpl-{i}", created_at=utcnow(), endpoint="chat.completions", model="m", version="2",
        adapter="default", messages=[{"role": "user", "content": f"q{i} card 4111 1111 1111 1111"}], answer=f"a{i}",
        sampling={"temperature": 0.0}, prompt_tokens=3, completion_tokens=2, latency_s=0.1, stream=False,
    ) | extra  # fmt: skip


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.integration  # starts a PostgreSQL server: make test-integration
def test_request_log_and_feedback_on_postgresql(postgres):
    log = RequestLog(postgres.url, RequestLogConfig(buffer_size=100), retry_min_s=0.05)
    try:
        for i in range(3):
            log.record(row(i))
        wait_for(lambda: log.stats()["written"] == 3)
        store = log.store()
        assert store.completion("chatcmpl-1").messages == [{"role": "user", "content": "q1 card [card]"}]
        first, created = store.put_feedback("chatcmpl-1", "api", rating="down", correction="A1.")
        again, created_again = store.put_feedback("chatcmpl-1", "api", rating="down", correction="A1!")
        assert created and not created_again and again.id == first.id
        store.put_feedback("chatcmpl-2", "api", score=5)
        assert [(f.completion_id, f.correction) for f, _ in store.feedback(rating="down")] == [("chatcmpl-1", "A1!")]
        assert log.stats()["database"].startswith("postgresql+psycopg://test@127.0.0.1:")

        postgres.stop()  # the database goes away: records wait
        log.record(row(3))
        log.record(row(4))
        wait_for(lambda: log.stats()["last_error"] is not None)
        assert log.stats()["pending"] == 2
        postgres.start()  # and comes back: they are written
        wait_for(lambda: log.stats()["written"] == 5)
        assert store.completion("chatcmpl-4") is not None and log.stats()["last_error"] is None

        store.add_completions([row(9, created_at=utcnow() - dt.timedelta(days=10))])
        store.put_feedback("chatcmpl-9", "api", rating="up")
        assert purge_older_than(store, 7) == 1  # its feedback goes with it (ON DELETE CASCADE)
        assert store.completion("chatcmpl-9") is None and len(store.feedback()) == 2
    finally:
        log.close()
    assert FeedbackStore.open(postgres.url).completion("chatcmpl-0") is not None  # migrated once, reopened as is


@pytest.mark.integration  # starts a PostgreSQL server: make test-integration
def test_feedback_source_reads_a_postgresql_store(postgres):
    """Completions by versions 3 and 4 and their feedback, written through FeedbackStore, come back through the
    loader ingest uses as canonical rows of each format: ids, texts, versions, the `since` window, validation."""
    store = FeedbackStore.open(postgres.url)
    store.add_completions(
        [row(i, version="3" if i <= 2 else "4", messages=[{"role": "user", "content": f"q{i}?"}]) for i in range(1, 6)]
    )
    store.put_feedback("chatcmpl-1", "api", rating="down", correction="c1")
    store.put_feedback("chatcmpl-2", "api", rating="up")
    store.put_feedback("chatcmpl-3", "api", score=5)
    store.put_feedback("chatcmpl-4", "api", score=3, comment="so-so")  # neither up nor down: no row
    store.put_feedback("chatcmpl-5", "api", rating="up")
    store.put_feedback("chatcmpl-5", "reviewer", score=1, correction="c5")  # newer, and a correction

    def load(fmt: str, since: dt.datetime | None = None):
        data = DataSource(source="feedback", url=postgres.url, format=fmt, since=None, min_rows=1)
        return load_rows(data.model_copy(update={"since": since}))

    def prompt(i: int) -> list[dict]:
        return [{"role": "user", "content": f"q{i}?"}]

    chat = load("chat")
    ids = ["feedback:chatcmpl-1", "feedback:chatcmpl-2", "feedback:chatcmpl-3", "feedback:chatcmpl-5"]
    assert chat["id"] == ids and set(chat["split"]) == {"train"}
    assert chat["messages"] == [prompt(i) + [{"role": "assistant", "content": a}] for i, a in
                                [(1, "c1"), (2, "a2"), (3, "a3"), (5, "c5")]]  # fmt: skip
    assert row_versions(chat) == dict(zip(ids, ["3", "3", "4", "4"]))

    pairs = load("pairs")
    assert pairs["id"] == ["feedback:chatcmpl-1", "feedback:chatcmpl-5"]
    assert (pairs["prompt"], pairs["chosen"], pairs["rejected"]) == ([prompt(1), prompt(5)], ["c1", "c5"], ["a1", "a5"])
    assert row_versions(pairs) == {"feedback:chatcmpl-1": "3", "feedback:chatcmpl-5": "4"}

    unpaired = load("unpaired")
    assert list(zip(unpaired["id"], unpaired["completion"], unpaired["label"], unpaired["label_text"])) == [
        ("feedback:chatcmpl-1", "a1", False, "down"),
        ("feedback:chatcmpl-2", "a2", True, "up"),
        ("feedback:chatcmpl-3", "a3", True, "up"),
        ("feedback:chatcmpl-5", "a5", False, "down"),  # the reviewer's newer score outranks the api thumb
    ]
    for ds in (chat, pairs, unpaired):
        clean, report = validate_dataset(ds, ValidationConfig())
        assert report.success and len(clean) == len(ds)

    cut = utcnow()  # timestamptz on the server: the window compares with an aware UTC time
    store.put_feedback("chatcmpl-4", "api", correction="c4")
    newer = load("chat", since=cut)
    assert newer["id"] == ["feedback:chatcmpl-4"] and newer["messages"][0][-1]["content"] == "c4"
    assert row_versions(newer) == {"feedback:chatcmpl-4": "4"}
