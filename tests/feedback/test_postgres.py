"""The request log and feedback on a real PostgreSQL server the test starts: Debian's `initdb` in a temp folder,
listening on 127.0.0.1 only (its unix socket in the same folder), stopped by the test. The Alembic migration, the
writer thread, idempotent feedback, filters, retention, and a server that goes down and comes back (the records
wait, then are written).

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
