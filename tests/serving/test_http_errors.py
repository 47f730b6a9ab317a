"""Every error branch docs/serving.md promises for the OpenAI routes, over real HTTP, on both engines.

The routes (core.serving.openai.routes.add_routes) run under uvicorn on 127.0.0.1 in a thread of this process, so
clients open real sockets: a stream is read chunk by chunk as the server sends it, and a client that hangs up is a
TCP close the server has to notice. Each test runs once on `engine: transformers` (the batch engine) and once on
`engine: llama_cpp` (llama-server as a child process; marked gguf and skipped without llama.cpp, as
tests/serving/test_llamacpp_engine.py is), over conftest's tiny model and its two adapters:

1. a full queue: 503 `server_overloaded`, `Retry-After: 1`, before any work (streaming or not);
2. the model still loading (the deployment's own model lookup before on_init is done), an engine not started yet
   (llama_cpp: the child is loading) and a stopped engine: 503 with `Retry-After: 1`, OpenAI's error shape;
3. a body that is not JSON: 400 `invalid_json`;
4. generation failing after the first chunk of a stream: an SSE `data: {"error": {...}}` event, then `[DONE]`, and
   the response ends (transformers: the engine raises after the first token; llama_cpp: the child is killed);
5. a streaming client that hangs up mid-answer: its row / slot is freed (the engine's `in_flight` back to 0,
   llama-server's /slots all idle) and the next request is answered.

Every server and child started here is stopped here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import signal
import threading
import time

import pytest
import requests
import uvicorn
from fastapi import FastAPI

from core.export import llamacpp
from core.serving.batching import Generation, QueueFullError
from core.serving.llamacpp_engine import LlamaCppEngine, free_port
from core.serving.model import ServeConfig, build_served_model, prompt_ids
from core.serving.openai import routes

SYSTEM = "You answer toy questions."
KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
QUESTION = "What is the code for item 3?"
LIMITS = dict(system_prompt=SYSTEM, context_length=96, max_new_tokens_limit=32, max_queued_requests=2)
NO_LLAMA = not (llamacpp.available() and llamacpp.server_available())

ENGINES = [
    pytest.param("transformers", id="transformers"),
    pytest.param(
        "llama_cpp",
        id="llama_cpp",
        marks=[
            pytest.mark.gguf,
            pytest.mark.integration,  # starts llama-server (a child process on loopback): make test-integration
            pytest.mark.skipif(
                NO_LLAMA, reason="llama.cpp not installed: make gguf-setup (runtime, converter and llama-server)"
            ),
        ],
    ),
]


def body(**change) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8} | change


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------
# The server: uvicorn on 127.0.0.1, the OpenAI routes over whatever `model()` returns now
# ---------------------------------------------------------------------------------------------------------------


class AppServer:
    def __init__(self, served):
        self.served = served
        self.model = lambda: self.served  # what the routes' served_model() returns; swapped by tests
        app = FastAPI()
        routes.add_routes(app, lambda: KEY, lambda: self.model())
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> AppServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn started")
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn stopped"

    @contextlib.contextmanager
    def serving(self, model):
        """The routes see `model` (a callable returning the served model, or raising) for the block."""
        self.model = model
        try:
            yield
        finally:
            self.model = lambda: self.served

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def post(self, payload: dict | bytes) -> tuple[int, dict, dict]:
        """POST /v1/chat/completions, not streamed: status, headers (lower-case names), JSON body."""
        conn = self.connect()
        try:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            conn.request("POST", "/v1/chat/completions", body=raw, headers=AUTH)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
        finally:
            conn.close()

    @contextlib.contextmanager
    def stream(self, payload: dict):
        """POST a `stream: true` request; yields the response and an iterator of its SSE `data:` payloads (dicts, or
        the string "[DONE]"). Leaving the block closes the connection (a client hanging up, if not read to the end)."""
        conn = self.connect()
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(payload | {"stream": True}), headers=AUTH)
            resp = conn.getresponse()

            def events():
                while line := resp.readline():
                    if line.startswith(b"data: "):
                        data = line[6:].strip()
                        yield "[DONE]" if data == b"[DONE]" else json.loads(data)

            yield resp, events()
        finally:
            conn.close()

    def answers(self) -> None:
        """The server still serves: a plain request gets a 200 with text."""
        status, _, got = self.post(body())
        assert status == 200, got
        assert got["choices"][0]["message"]["content"] is not None and got["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """llama_cpp's GGUF files (model and LoRAs) go to a temporary folder, not the user's cache."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_PIPELINE_GGUF_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tiny_source, two_adapters):
    kind = request.param
    extra = {"gguf_type": "f16", "parallel": 1} if kind == "llama_cpp" else {"max_batch_size": 1}
    if kind == "llama_cpp":
        request.getfixturevalue("gguf_cache")
    cfg = ServeConfig(engine=kind, **extra, **LIMITS)
    model = build_served_model(cfg, tiny_source, adapter_dirs={"default": two_adapters[0]})
    yield model
    model.engine.stop()


@pytest.fixture(scope="module")
def server(served):
    with AppServer(served) as app:
        yield app


def is_llama(served) -> bool:
    return isinstance(served.engine, LlamaCppEngine)


@pytest.fixture(autouse=True)
def healthy(served):
    """Each test starts with llama-server up (a failed test may leave it restarting)."""
    if is_llama(served):
        wait_for(served.engine.health, 120, "llama-server up")


@contextlib.contextmanager
def tapped(served, on_delta):
    """Every generation submitted in the block calls `on_delta(gen)` in the engine's thread after each piece of text
    it passes on (after the client's sink got it). Yields the list of those generations."""
    engine, seen = served.engine, []
    submit = engine.submit

    def tap(gen: Generation) -> Generation:
        inner = gen.sink

        def sink(kind, value):
            inner(kind, value)
            if kind == "delta":
                on_delta(gen)

        gen.sink = sink
        seen.append(gen)
        return submit(gen)

    engine.submit = tap
    try:
        yield seen
    finally:
        del engine.submit


def assert_openai_error(status: int, headers: dict, got: dict, want_status: int, code: str) -> None:
    assert status == want_status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, got
    assert got["error"]["code"] == code, got
    assert got["error"]["type"] == ("server_error" if want_status >= 500 else "invalid_request_error")
    if want_status == 503:
        assert headers.get("retry-after") == "1", headers


def idle(served) -> None:
    wait_for(lambda: served.engine.in_flight == 0, 30, f"the engine idle (in_flight {served.engine.in_flight})")
    if is_llama(served):  # llama-server frees a slot once it notices its client (the engine) went away

        def slots_idle() -> bool:
            slots = requests.get(served.engine.url + "/slots", timeout=5).json()
            return bool(slots) and not any(s["is_processing"] for s in slots)

        wait_for(slots_idle, 20, "llama-server's slots idle")


# ---------------------------------------------------------------------------------------------------------------
# 1. A full queue
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def held(served):
    """The engine accepts requests but generates nothing in the block: the batch engine's worker waits for the model
    lock, llama-server is frozen (SIGSTOP)."""
    if is_llama(served):
        pid = served.engine.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
    else:
        with served.lock:
            yield


def test_full_queue_is_503_server_overloaded_with_retry_after(served, server):
    engine = served.engine
    ids = prompt_ids(served, QUESTION, "default")
    refused_before, requests_before = engine.stats["refused"], engine.stats["requests"]
    held_gens = []
    with held(served):
        held_gens.append(engine.submit(Generation("default", ids, 4)))  # taken: the batch row / the slot
        if not is_llama(served):
            wait_for(lambda: not engine._waiting, 10, "the worker took the first request")
        with pytest.raises(QueueFullError):
            for _ in range(10):
                held_gens.append(engine.submit(Generation("default", ids, 4)))
        assert len(held_gens) == 1 + served.config.max_queued_requests  # the row/slot, then the queue
        for payload in (body(), body(stream=True)):
            status, headers, got = server.post(payload)
            assert_openai_error(status, headers, got, 503, "server_overloaded")
            assert "server at capacity" in got["error"]["message"]
        for gen in held_gens:
            gen.cancel()
    assert engine.stats["refused"] == refused_before + 3
    assert engine.stats["requests"] == requests_before + len(held_gens), "the 503s did no work"
    wait_for(lambda: all(g.finish_reason for g in held_gens), 60, "the held requests finished")
    idle(served)
    server.answers()


# ---------------------------------------------------------------------------------------------------------------
# 2. Loading, not started, stopped
# ---------------------------------------------------------------------------------------------------------------


def test_loading_and_stopped_engine_are_503s_with_retry_after(served, server, tiny_source):
    # The deployment's model lookup before on_init has loaded the model (no ZenML run state here): model_loading.
    with server.serving(routes._served_model):
        assert_openai_error(*server.post(body()), 503, "model_loading")
        assert_openai_error(*server.post(body(stream=True)), 503, "model_loading")
    if is_llama(served):  # an engine whose llama-server is not started (loading): engine_unavailable
        loading = LlamaCppEngine(served.engine.model_file, {}, slots=1, ctx_size=96, max_queue=1)
        with server.serving(lambda: dataclasses.replace(served, _engine=loading)):
            assert_openai_error(*server.post(body(model="base")), 503, "engine_unavailable")
        stopped = LlamaCppEngine(served.engine.model_file, {}, slots=1, ctx_size=96, max_queue=1).start()
        pid = stopped.pid
        stopped.stop()
        assert pid is not None and stopped.pid is None
    else:
        stopped = dataclasses.replace(served, _engine=None).engine  # a second batch engine on the same model
        stopped.submit(Generation("base", prompt_ids(served, QUESTION, "base"), 2))  # its worker runs
        stopped.stop()
    with server.serving(lambda: dataclasses.replace(served, _engine=stopped)):
        assert_openai_error(*server.post(body(model="base")), 503, "server_stopping")
        assert_openai_error(*server.post(body(model="base", stream=True)), 503, "server_stopping")
    server.answers()


# ---------------------------------------------------------------------------------------------------------------
# 3. Not JSON
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b'{"model": "default", "messages": [', b"\xff\xfe not text", b""], ids=["cut", "not-utf8", "empty"]
)
def test_body_that_is_not_json_is_400_invalid_json(served, server, raw):
    before = served.engine.stats["requests"]
    status, headers, got = server.post(raw)
    assert_openai_error(status, headers, got, 400, "invalid_json")
    assert got["error"]["message"] == "the request body is not valid JSON" and "retry-after" not in headers
    assert served.engine.stats["requests"] == before
    server.answers()


# ---------------------------------------------------------------------------------------------------------------
# 4. Generation failing mid-stream
# ---------------------------------------------------------------------------------------------------------------


def test_generation_failing_after_the_first_chunk_ends_the_stream_with_an_error_event(served, server):
    llama = is_llama(served)
    old_pid = served.engine.pid if llama else None

    def fail(gen):
        if llama:  # llama-server dies while it generates; the monitor starts a new one
            if alive(old_pid):
                os.kill(old_pid, signal.SIGKILL)
                wait_for(lambda: not alive(old_pid), 10, "llama-server killed")
        else:
            raise RuntimeError("injected failure after the first token")

    with tapped(served, fail) as gens, server.stream(body(max_tokens=32, temperature=0)) as (resp, events):
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        got = list(events)  # to the end: the server closes the stream
        assert resp.read() == b""
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert got[1]["choices"][0]["delta"]["content"], got  # the first piece of text arrived
    assert got[-1] == "[DONE]" and "error" in got[-2], got
    error = got[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    if llama:
        assert error["code"] == "engine_unavailable" and "llama-server went away" in error["message"]
    else:
        assert error["code"] == "generation_failed" and "injected failure" in error["message"]
    assert all("choices" in e and e["choices"][0]["finish_reason"] is None for e in got[:-2]), got
    assert gens[0].finish_reason in ("error", "unavailable")
    if llama:
        wait_for(served.engine.health, 120, "llama-server restarted")
        assert served.engine.pid != old_pid
    idle(served)
    server.answers()


def alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# 5. A client hanging up mid-stream
# ---------------------------------------------------------------------------------------------------------------


def test_client_hanging_up_mid_stream_frees_its_row_or_slot(served, server):
    cancelled_before = served.engine.stats["cancelled"]

    def slow(gen):  # at most 0.5 s a piece of text from now on, so the answer outlasts the client
        gen.cancelled.wait(0.5)

    with tapped(served, slow) as gens:
        with server.stream(body(max_tokens=32, temperature=0)) as (resp, events):
            assert resp.status == 200
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"
            assert next(events)["choices"][0]["delta"]["content"]
            assert served.engine.in_flight == 1
        # hung up after the first piece of text
        wait_for(lambda: gens[0].finish_reason is not None, 10, "the abandoned generation ended")
    gen = gens[0]
    assert gen.finish_reason == "cancelled" and gen.cancelled.is_set(), (gen.finish_reason, gen.text)
    assert served.engine.stats["cancelled"] == cancelled_before + 1
    idle(served)
    server.answers()
