"""The request log and the feedback API on the OpenAI routes, in process: the official `openai` client through
FastAPI's transport (as tests/serving/test_openai_api.py), over conftest's tiny model.

Every completion answered (whole or streamed) is recorded, redacted; POST /v1/feedback rates and corrects it,
idempotently per (completion, source); unknown ids 404, bad ratings 400, no key 401, a database that is down 503
while chat keeps answering; GET /v1/feedback filters; GET /v1/feedback/stats counts.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.feedback.config import RequestLogConfig
from core.feedback.requestlog import RequestLog
from core.feedback.store import sqlite_url
from core.serving.model import ServeConfig, build_served_model
from core.serving.openai.routes import add_routes

KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "What is the code for item 3? Mail me at jane@example.com"


def wait_for(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tiny_source, two_adapters):
    cfg = ServeConfig(context_length=96, max_new_tokens_limit=16, batch_wait_ms=0)
    model = build_served_model(cfg, tiny_source, adapter_dirs={"default": two_adapters[0], "prices": two_adapters[1]})
    model.info |= {"model_name": "feedback-test", "model_version": "7"}
    yield model
    model.engine.stop()


@pytest.fixture
def log(served, tmp_path):
    """A fresh request log per test, on the served model (as the deployment's on_init hook attaches it)."""
    served.request_log = RequestLog(sqlite_url(tmp_path / "log.db"), retry_min_s=0.05)
    yield served.request_log
    served.request_log.close()
    served.request_log = None


@pytest.fixture(scope="module")
def client(served):
    app = FastAPI()
    add_routes(app, lambda: KEY, lambda: served)
    with TestClient(app, base_url="http://127.0.0.1") as http:
        yield openai.OpenAI(base_url="http://127.0.0.1/v1", api_key=KEY, http_client=http, max_retries=0), http


def chat(oa, **extra):
    messages = [{"role": "user", "content": QUESTION}]
    return oa.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0, **extra)


def rate(oa, **body) -> dict:
    return oa.post("/feedback", body=body, cast_to=object)


def test_completions_are_recorded_and_rated_corrected_and_listed(client, log):
    oa, http = client
    whole = chat(oa)
    chunks = list(chat(oa, stream=True))
    streamed_id, streamed_text = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    up = rate(oa, completion_id=whole.id, rating="up")
    assert up["completion_id"] == whole.id and up["rating"] == "up" and up["score"] is None and up["source"] == "api"
    down = rate(oa, completion_id=streamed_id, rating="down", correction="Code C3.", comment="wrong item")
    again = rate(oa, completion_id=streamed_id, rating=2, correction="Code C3, sorry.")  # a repeat updates the row
    assert again["id"] == down["id"] and (again["rating"], again["score"]) == (None, 2)
    assert again["correction"] == "Code C3, sorry." and again["comment"] is None
    other = rate(oa, completion_id=streamed_id, rating="down", source="reviewer")  # another source: its own row
    assert other["id"] != down["id"]

    rows = http.get("/v1/feedback", headers=AUTH).json()["data"]
    assert [(r["completion_id"], r["source"]) for r in rows] == [
        (whole.id, "api"), (streamed_id, "api"), (streamed_id, "reviewer"),
    ]  # fmt: skip
    first, second = rows[0]["completion"], rows[1]["completion"]
    assert first["answer"] == whole.choices[0].message.content and not first["stream"] and second["stream"]
    assert second["answer"] == streamed_text
    assert first["messages"] == [{"role": "user", "content": "What is the code for item 3? Mail me at [email]"}]
    assert (first["model"], first["version"], first["adapter"], first["endpoint"]) == (
        "feedback-test", "7", "default", "chat.completions",
    )  # fmt: skip
    assert first["completion_tokens"] == whole.usage.completion_tokens
    assert first["prompt_tokens"] == whole.usage.prompt_tokens
    assert first["sampling"] | {"stop": None} == {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 8,
        "stop": None,
        "seed": None,
    }

    def listed(query: str) -> list[str]:
        got = http.get(f"/v1/feedback?{query}", headers=AUTH)
        assert got.status_code == 200, got.text
        return [(r["completion_id"], r["source"]) for r in got.json()["data"]]

    assert listed("rating=up") == [(whole.id, "api")]
    by_client = oa.get("/feedback", cast_to=object, options={"params": {"rating": "up"}})["data"]  # docs' example
    assert [r["completion_id"] for r in by_client] == [whole.id]
    assert listed("rating=down") == [(streamed_id, "reviewer")]
    assert listed("version=7&limit=1") == [(whole.id, "api")] and listed("version=8") == []
    assert listed("since=" + quote(rows[1]["updated_at"])) == [(streamed_id, "api"), (streamed_id, "reviewer")]
    assert listed("until=" + quote(rows[1]["updated_at"])) == [(whole.id, "api")]
    stats = http.get("/v1/feedback/stats", headers=AUTH).json()
    assert stats["written"] == 2 and stats["dropped"] == 0 and stats["pending"] == 0 and stats["last_error"] is None


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"rating": "meh"}, "rating", 'rating must be "up", "down" or an integer score from 1 to 5'),
        ({"rating": 6}, "rating", "an integer score from 1 to 5"),
        ({"rating": True}, "rating", "an integer score from 1 to 5"),
        ({"completion_id": None}, "completion_id", "completion_id must be a string"),
        ({"stars": 5}, "stars", "unrecognized request argument: stars"),
        ({"rating": None}, "rating", "an integer score from 1 to 5"),
    ],
)
def test_malformed_feedback_is_400_naming_the_param(client, log, body, param, message):
    oa, _ = client
    with pytest.raises(openai.BadRequestError, match=message) as err:
        rate(oa, **({"completion_id": "chatcmpl-x", "rating": "up"} | body))
    assert err.value.param == param and err.value.status_code == 400


def test_unknown_completion_is_404_and_no_key_is_401(client, log):
    oa, http = client
    with pytest.raises(openai.NotFoundError, match="no completion 'chatcmpl-nope'") as err:
        rate(oa, completion_id="chatcmpl-nope", rating="up")
    assert err.value.code == "completion_not_found" and err.value.param == "completion_id"
    for path, method in (("/v1/feedback", "post"), ("/v1/feedback", "get"), ("/v1/feedback/stats", "get")):
        got = getattr(http, method)(
            path, **({"json": {"completion_id": "x", "rating": "up"}} if method == "post" else {})
        )
        assert got.status_code == 401 and got.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        oa.with_options(api_key="wrong").post("/feedback", body={"completion_id": "x", "rating": "up"}, cast_to=object)
    bad = http.get("/v1/feedback?rating=meh", headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"


def test_database_down_chat_answers_feedback_503_then_all_is_written(client, served, tmp_path):
    oa, http = client
    folder = tmp_path / "later"  # does not exist yet: the SQLite file cannot be opened
    served.request_log = RequestLog(sqlite_url(folder / "log.db"), RequestLogConfig(buffer_size=10), retry_min_s=0.05)
    try:
        answered = [chat(oa).id for _ in range(3)]  # the answers come although nothing can be written
        wait_for(lambda: served.request_log.stats()["last_error"] is not None)
        stats = http.get("/v1/feedback/stats", headers=AUTH).json()
        assert stats["pending"] == 3 and stats["written"] == 0 and "unable to open database" in stats["last_error"]
        down = http.post("/v1/feedback", json={"completion_id": answered[0], "rating": "up"}, headers=AUTH)
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert down.json()["error"]["code"] == "database_unavailable"
        folder.mkdir()  # back
        assert rate(oa, completion_id=answered[0], rating="up")["rating"] == "up"  # its completion written first
        wait_for(lambda: served.request_log.stats()["written"] == 3)
        assert http.get("/v1/feedback/stats", headers=AUTH).json()["last_error"] is None
    finally:
        served.request_log.close()
        served.request_log = None


def test_log_requests_off_records_nothing_and_feedback_is_404(client, served):
    oa, http = client
    assert served.request_log is None  # as open_request_log leaves it with log_requests: false
    assert chat(oa).choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError, match="log_requests: false") as err:
        rate(oa, completion_id="chatcmpl-x", rating="up")
    assert err.value.code == "feedback_disabled"
    assert http.get("/v1/feedback/stats", headers=AUTH).status_code == 404
