"""The OpenAI-compatible API and the batch engine behind every served request, in process.

The routes are core.serving.openai.routes's, mounted on a FastAPI app and driven by the official `openai` client through
FastAPI's in-process transport; tests/serving/test_serve.py drives the same routes on a real deployment over HTTP.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.serving.batching import Generation, QueueFullError, finish, take_token
from core.serving.model import ServeConfig, answer, build_served_model
from core.serving.openai.errors import OpenAIError
from core.serving.openai.routes import add_routes, check_access
from core.serving.openai.service import parse_chat_request

SYSTEM = "You answer toy questions."
QUESTION = "What is the code for item 3?"
KEY = "test-key-not-a-secret"


@pytest.fixture(scope="module")
def served(tiny_source, two_adapters):
    cfg = ServeConfig(system_prompt=SYSTEM, context_length=96, max_new_tokens_limit=32, batch_wait_ms=50)
    model = build_served_model(cfg, tiny_source, adapter_dirs={"default": two_adapters[0], "prices": two_adapters[1]})
    yield model
    model.engine.stop()


@pytest.fixture(scope="module")
def client(served):
    app = FastAPI()
    add_routes(app, lambda: KEY, lambda: served)
    with TestClient(app, base_url="http://127.0.0.1") as http:  # the request arrives on loopback
        yield openai.OpenAI(base_url="http://127.0.0.1/v1", api_key=KEY, http_client=http, max_retries=0), http


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_mixed_adapter_batch_answers_as_each_request_alone(served):
    alone = {name: answer(served, QUESTION, name, 12)["answer"] for name in ("default", "prices", "base")}
    assert len(set(alone.values())) == 3, alone  # three different models
    before = served.engine.stats["batches"]
    done = {}

    def ask(name):
        done[name] = answer(served, QUESTION, name, 12)["answer"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("default", "prices", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == alone
    assert served.engine.stats["batches"] - before == 1, "sent together, generated as one batch"


def test_full_queue_refuses_and_cancelled_rows_free_their_place(tiny_source, two_adapters):
    cfg = ServeConfig(system_prompt=SYSTEM, context_length=96, max_queued_requests=1, batch_wait_ms=0)
    served = build_served_model(cfg, tiny_source, adapter_dirs={"default": two_adapters[0]})
    engine = served.engine
    ids = served.tokenizer(QUESTION)["input_ids"]
    try:
        with served.lock:  # the worker takes the first request, then waits for the model
            first = engine.submit(Generation("default", ids, 8))
            deadline = time.monotonic() + 10
            while engine._waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            second = engine.submit(Generation("default", ids, 8))
            with pytest.raises(QueueFullError, match="1 requests waiting"):
                engine.submit(Generation("default", ids, 8))
            second.cancel()  # its client went away: its place is free again
            third = engine.submit(Generation("default", ids, 8))
        deadline = time.monotonic() + 60
        while third.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.finish_reason in ("stop", "length") and third.finish_reason in ("stop", "length")
        assert second.finish_reason == "cancelled" and second.tokens == []
        assert engine.stats["refused"] == 1 and engine.stats["cancelled"] == 1
    finally:
        engine.stop()


def test_stop_strings_cut_the_text_and_streamed_deltas_add_up(served):
    from core.serving.model import prompt_ids

    ids = prompt_ids(served, QUESTION, "default")
    full = served.engine.generate(Generation("default", ids, 16)).text
    assert len(full) > 4, full
    stop = full[3:5]
    deltas = []
    gen = served.engine.generate(Generation("default", ids, 16, stop=[stop], sink=lambda k, v: deltas.append((k, v))))
    assert gen.text == full[: full.index(stop)] and gen.finish_reason == "stop"
    assert "".join(v for k, v in deltas if k == "delta") == gen.text
    assert deltas[-1] == ("done", "stop")


def test_openai_client_chats_streams_and_switches_adapters(served, client):
    oa, _ = client
    models = [m.id for m in oa.models.list().data]
    assert models == ["base", "default", "prices"]
    for name in ("default", "prices", "default", "base"):
        reply = oa.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=12, temperature=0)
        assert reply.model == name and reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content.strip() == answer(served, QUESTION, name, 12)["answer"]
        assert 1 <= reply.usage.completion_tokens <= 12
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    plain = oa.chat.completions.create(model="prices", messages=user(QUESTION), max_tokens=12, temperature=0)
    chunks = list(
        oa.chat.completions.create(
            model="prices",
            messages=user(QUESTION),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # multi-turn: the earlier turns are part of the prompt
    turns = [*user("What is item 1?"), {"role": "assistant", "content": "Code A1."}, *user(QUESTION)]
    longer = oa.chat.completions.create(model="default", messages=turns, max_tokens=4, temperature=0)
    assert longer.usage.prompt_tokens > plain.usage.prompt_tokens
    # seeded sampling repeats itself
    sampled = [
        oa.chat.completions.create(
            model="default", messages=user(QUESTION), max_tokens=12, temperature=1.5, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(
    "change, status, param, message",
    [
        ({"model": "nope"}, 404, "model", "The model 'nope' does not exist here; models served: base, default, prices"),
        ({"messages": []}, 400, "messages", "messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "role must be one of"),
        ({"messages": [{"role": "user", "content": " "}]}, 400, "messages[0].content", "must not be empty"),
        ({"messages": user("hi") + [{"role": "assistant", "content": "yo"}]}, 400, "messages[1].role", "last message"),
        ({"messages": user("word " * 120)}, 400, "messages", "maximum context length is 96 tokens"),
        ({"max_tokens": 1000}, 400, "max_tokens", "must be an integer from 1 to 32"),
        ({"temperature": 3}, 400, "temperature", "at most 2.0"),
        ({"top_p": 0}, 400, "top_p", "above 0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
        ({"n": 2}, 400, "n", "n=2 is not supported"),
        ({"best_of": 2}, 400, "best_of", "unrecognized request argument: best_of"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, served, change, status, param, message):
    _, http = client
    body = {"model": "default", "messages": user(QUESTION), "max_tokens": 4} | change
    before = served.engine.stats["requests"]
    got = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"]
    assert served.engine.stats["requests"] == before, "refused before any generation"
    ok = http.post("/v1/chat/completions", json={"model": "default", "messages": user(QUESTION), "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert ok.status_code == 200


def test_key_required_and_checked_before_any_model_work(client, served):
    oa, http = client
    before = served.engine.stats["requests"]
    body = {"model": "default", "messages": user(QUESTION), "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        got = http.post("/v1/chat/completions", json=body, headers=headers)
        assert got.status_code == 401 and got.json()["error"]["code"] == "invalid_api_key", got.text
        assert KEY not in got.text
    assert http.get("/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        oa.with_options(api_key="wrong").chat.completions.create(model="default", messages=user(QUESTION))
    assert served.engine.stats["requests"] == before
    # no key configured: loopback only
    check_access(None, None, "127.0.0.1")
    with pytest.raises(OpenAIError, match="no auth key but was reached on a non-loopback address"):
        check_access(None, None, "10.1.2.3")


def test_parse_keeps_the_trained_prompt_format(served):
    from core.serving.model import prompt_ids

    parsed = parse_chat_request(served, {"model": "prices", "messages": user(QUESTION)})
    assert parsed.generation.input_ids == prompt_ids(served, QUESTION, "prices")  # the configured system prompt
    assert parsed.generation.temperature == 1.0 and parsed.generation.max_new_tokens == 32  # OpenAI's default, limit
    own = parse_chat_request(
        served, {"model": "prices", "messages": [{"role": "system", "content": "Be brief."}, *user(QUESTION)]}
    )
    assert own.generation.input_ids != parsed.generation.input_ids
    assert "Be brief." in served.tokenizer.decode(own.generation.input_ids)
    assert SYSTEM not in served.tokenizer.decode(own.generation.input_ids)


def test_an_answer_cut_inside_a_character_ends_before_it(bundled_tokenizer_dir):
    """max_new_tokens cutting a multi-byte character leaves no U+FFFD at the end of the answer or the stream."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    ids = tok.encode("Caf\u00e9 \U0001f3d5", add_special_tokens=False)  # the tent emoji: several byte tokens
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # the case: a prefix of the emoji's bytes
    deltas: list[str] = []
    gen = Generation(adapter="default", input_ids=[1], max_new_tokens=len(ids) - 1,
                     sink=lambda kind, value: deltas.append(value) if kind == "delta" else None)  # fmt: skip
    reasons = [take_token(gen, t, tok, eos_ids=set()) for t in ids[:-1]]
    assert reasons[-1] == "length"
    finish(gen, "length")
    assert gen.text == "Caf\u00e9 " and "".join(deltas) == gen.text
