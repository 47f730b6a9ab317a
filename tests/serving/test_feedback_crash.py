"""No acknowledged feedback is lost: a server process answers, takes feedback (200), is killed with SIGKILL (no
shutdown hook, no flush), and after a restart on the same database the feedback and its completion are there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
import requests
from conftest import REPO_ROOT

from core.feedback.store import sqlite_url
from core.serving.llamacpp_engine import free_port

KEY = "test-key-not-a-secret"


def start(spec_path) -> subprocess.Popen:
    spec = json.loads(spec_path.read_text())
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests/support/feedback_server.py"), str(spec_path)])
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{spec['port']}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                            timeout=5).status_code == 200:  # fmt: skip
                return proc
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"feedback server did not start (exit {proc.poll()})")
        time.sleep(0.3)


@pytest.mark.integration  # starts a server process twice: make test-integration
def test_acknowledged_feedback_survives_sigkill(tmp_path, tiny_source, two_adapters):
    spec_path = tmp_path / "spec.json"
    port = free_port()
    spec = {"base": tiny_source.model_dump(), "adapter": str(two_adapters[0]), "url": sqlite_url(tmp_path / "log.db"),
            "port": port, "key": KEY}  # fmt: skip
    spec_path.write_text(json.dumps(spec))
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    proc = start(spec_path)
    try:
        reply = oa.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "What is item 3?"}], max_tokens=8, temperature=0
        )
        ack = oa.post("/feedback", body={"completion_id": reply.id, "rating": "down", "correction": "C3."},
                      cast_to=object)  # fmt: skip
        assert ack["correction"] == "C3."
        os.kill(proc.pid, signal.SIGKILL)  # right after the 200: no on_cleanup, no flush
        proc.wait(30)
        proc = start(spec_path)
        rows = oa.get("/feedback", cast_to=object)["data"]
        assert [(r["completion_id"], r["rating"], r["correction"]) for r in rows] == [(reply.id, "down", "C3.")]
        assert rows[0]["completion"]["answer"] == reply.choices[0].message.content
    finally:
        proc.kill()
        proc.wait(30)
