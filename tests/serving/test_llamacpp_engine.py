"""engine: llama_cpp: llama.cpp's llama-server as the deployment's child process, behind the same OpenAI routes.

Needs `make gguf-setup` (llama-cpp-python, the converter, and the llama-server build); skipped with that reason
without it. The model is conftest's tiny Llama (SmolLM2's tokenizer) with its two adapters, made into an f16 GGUF
and two GGUF LoRAs by the engine's own first-start path; the OpenAI routes are mounted on a FastAPI app and driven
by the official `openai` client (FastAPI's in-process transport), as in tests/serving/test_openai_api.py. The
transformers engine on the same folders is the reference for greedy answers. llama-server listens on 127.0.0.1
only; every child started here is stopped here, and the tests check that none is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.export import llamacpp
from core.serving.batching import EngineUnavailableError, Generation, QueueFullError
from core.serving.model import ServeConfig, build_served_model, prompt_ids

pytestmark = [
    pytest.mark.gguf,
    pytest.mark.integration,  # starts llama-server (a child process on loopback): make test-integration
    pytest.mark.skipif(
        not (llamacpp.available() and llamacpp.server_available()),
        reason="llama.cpp not installed: make gguf-setup (runtime, converter and llama-server)",
    ),
]
SYSTEM = "You answer toy questions."
KEY = "test-key-not-a-secret"
QUESTIONS = ["What is the code for item 3?", "What is the code for item 11?", "Tell me about item 5."]
LIMITS = dict(system_prompt=SYSTEM, context_length=96, max_new_tokens_limit=32)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """The engine's GGUF files (model and LoRAs) go to a temporary folder, not the user's cache."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_PIPELINE_GGUF_CACHE", str(cache))  # inherited by a deployment's server process too
        yield cache


@pytest.fixture(scope="module")
def adapters(two_adapters):
    return {"default": two_adapters[0], "prices": two_adapters[1]}


@pytest.fixture(scope="module")
def served(gguf_cache, tiny_source, adapters):
    """The llama_cpp engine on f16: the GGUF and LoRAs made at load (first start), 2 slots."""
    cfg = ServeConfig(engine="llama_cpp", gguf_type="f16", parallel=2, max_queued_requests=4, **LIMITS)
    model = build_served_model(cfg, tiny_source, adapter_dirs=adapters)
    pid = model.engine.pid
    yield model
    model.engine.stop()
    assert not alive(pid), "stopping the engine stops its llama-server"


@pytest.fixture(scope="module")
def reference(tiny_source, adapters):
    """The transformers engine on the same base and adapters."""
    model = build_served_model(ServeConfig(**LIMITS), tiny_source, adapter_dirs=adapters)
    yield model
    model.engine.stop()


@pytest.fixture(scope="module")
def client(served):
    from core.serving.openai.routes import add_routes

    app = FastAPI()
    add_routes(app, lambda: KEY, lambda: served)
    with TestClient(app, base_url="http://127.0.0.1") as http:  # the request arrives on loopback
        yield openai.OpenAI(base_url="http://127.0.0.1/v1", api_key=KEY, http_client=http, max_retries=0), http


def greedy(served, question: str, adapter: str, n: int) -> Generation:
    gen = Generation(adapter=adapter, input_ids=prompt_ids(served, question, adapter), max_new_tokens=n)
    return served.engine.generate(gen, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_loads_gguf_and_loras_on_loopback(served, gguf_cache):
    info = served.info
    assert info["engine"] == "llama_cpp" and info["gguf_type"] == "f16" and info["gguf"].endswith("-F16.gguf")
    assert served.adapters == ["base", "default", "prices"]
    command = served.engine.command(served.engine.port)
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--parallel") + 1] == "2"
    assert command.count("--lora") == 2 and "--lora-init-without-apply" in command
    assert len(list(gguf_cache.glob("lora/*/adapter-F16.gguf"))) == 2
    assert served.engine.health()


def test_greedy_answers_equal_the_transformers_engine_per_adapter(served, reference):
    """f16 GGUF + GGUF LoRAs in llama.cpp answer as peft in transformers does, token for token (first 12)."""
    answers = {}
    for adapter in ("default", "prices", "base"):
        for question in QUESTIONS:
            got = greedy(served, question, adapter, 12)
            want = greedy(reference, question, adapter, 12)
            assert got.tokens == want.tokens, (adapter, question, got.text, want.text)
            assert got.text == want.text and got.finish_reason == want.finish_reason
            answers[adapter, question] = got.text
    assert len({answers[a, QUESTIONS[0]] for a in ("default", "prices", "base")}) == 3  # three different models


def test_two_adapters_at_once_answer_each_with_its_own(served, reference):
    want = {a: greedy(reference, QUESTIONS[0], a, 12).text for a in ("default", "prices")}
    got = {}

    def ask(adapter):
        got[adapter] = greedy(served, QUESTIONS[0], adapter, 12).text

    threads = [threading.Thread(target=ask, args=(a,)) for a in ("default", "prices")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_openai_client_chat_stream_stop_seed(client, reference):
    oa, _ = client
    assert [m.id for m in oa.models.list().data] == ["base", "default", "prices"]
    want = greedy(reference, QUESTIONS[0], "prices", 16).text
    reply = oa.chat.completions.create(model="prices", messages=user(QUESTIONS[0]), max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert text == want and reply.model == "prices"
    assert reply.usage.prompt_tokens == len(prompt_ids(reference, QUESTIONS[0], "prices"))
    assert 1 <= reply.usage.completion_tokens <= 16
    stream = oa.chat.completions.create(
        model="prices", messages=user(QUESTIONS[0]), max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # a stop string cuts the answer before it (and is not sent)
    stop = text.strip()[3:6]
    assert len(stop) == 3, text
    cut = oa.chat.completions.create(
        model="prices", messages=user(QUESTIONS[0]), max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # sampling: the same seed, the same answer
    sampled = [
        oa.chat.completions.create(
            model="default", messages=user(QUESTIONS[1]), max_tokens=16, temperature=1.5, seed=seed
        )
        .choices[0]
        .message.content
        for seed in (7, 7, 8, 9)
    ]
    assert sampled[0] == sampled[1] and len(set(sampled)) > 1


def test_openai_client_refusals(client):
    oa, http = client
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="wrong", http_client=http, max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="models served: base, default, prices") as err:
        oa.chat.completions.create(model="nope", messages=user(QUESTIONS[0]))
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 96 tokens"):
        oa.chat.completions.create(model="default", messages=user("word " * 100))


def test_child_killed_mid_request_is_a_503_then_served_again(served, client):
    """The child dies while a request is in it: that client gets a clean 503 (OpenAI's error shape, Retry-After);
    the monitor starts a new child and the next request is answered."""
    oa, http = client
    engine = served.engine
    before = oa.chat.completions.create(model="default", messages=user(QUESTIONS[0]), max_tokens=12, temperature=0)
    old = engine.pid
    os.kill(old, signal.SIGSTOP)  # frozen: the request below is sent and accepted, but not answered
    body = {"model": "default", "messages": user(QUESTIONS[0]), "max_tokens": 12, "temperature": 0}
    answer = {}
    sender = threading.Thread(
        target=lambda: answer.update(
            r=http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        )
    )
    sender.start()
    deadline = time.monotonic() + 10
    while engine.stats["requests"] == 0 or not engine._active:  # the request reached the engine
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # its POST is in the child's socket
    os.kill(old, signal.SIGKILL)
    sender.join(timeout=30)
    got = answer["r"]
    assert got.status_code == 503 and got.headers["Retry-After"] == "1"
    assert got.json()["error"]["code"] == "engine_unavailable" and got.json()["error"]["type"] == "server_error"
    deadline = time.monotonic() + 120
    while not engine.health():  # the monitor's new child
        assert time.monotonic() < deadline, "llama-server was not restarted"
        time.sleep(0.1)
    assert engine.pid != old and not alive(old) and engine.stats["restarts"] >= 1
    after = oa.chat.completions.create(model="default", messages=user(QUESTIONS[0]), max_tokens=12, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content


def test_down_engine_and_full_queue_are_503s(served, client):
    """While the child is down new requests get 503 at once; beyond slots + max_queued_requests, 503 overloaded."""
    oa, http = client
    engine = served.engine
    engine._up.clear()  # what the monitor does between a child's death and the next one's /health
    try:
        with pytest.raises(openai.InternalServerError) as err:
            oa.chat.completions.create(model="default", messages=user(QUESTIONS[0]), max_tokens=4)
        assert err.value.status_code == 503 and err.value.code == "engine_unavailable"
    finally:
        engine._up.set()
    os.kill(engine.pid, signal.SIGSTOP)  # slots (2) and the queue (4) fill up and stay full
    try:
        held = [engine.submit(Generation("default", prompt_ids(served, QUESTIONS[0], "default"), 4)) for _ in range(6)]
        with pytest.raises(QueueFullError, match="4 requests waiting"):
            engine.submit(Generation("default", [1, 2, 3], 4))
        refused = http.post("/v1/chat/completions", json={"model": "default", "messages": user("hi")},
                            headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_overloaded"
    finally:
        os.kill(engine.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while any(g.finish_reason is None for g in held):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {g.finish_reason for g in held} <= {"stop", "length"}


def test_stop_leaves_no_process_and_refuses_after(served):
    """A second engine on the same files: stop() ends its child and its monitor; then submit is refused."""
    from core.serving.batching import EngineStoppedError
    from core.serving.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(served.engine.model_file, {}, slots=1, ctx_size=128, max_queue=1)
    engine.start()
    pid = engine.pid
    try:
        assert alive(pid) and engine.health()
    finally:
        engine.stop()
    assert not alive(pid) and not engine._monitor_thread.is_alive()
    with pytest.raises(EngineStoppedError):
        engine.submit(Generation("base", [1, 2, 3], 2))
    with pytest.raises(EngineUnavailableError):
        engine.restart(timeout_s=1)


def llama_servers(marker: str) -> list[int]:
    """Pids of running llama-server processes whose command line holds `marker` (a path of this test's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"llama-server")
            and marker.encode() in b" ".join(cmdline)
            and alive(int(proc.name))
        ):
            pids.append(int(proc.name))
    return pids


@pytest.mark.integration  # a deployed server process: make test-integration
def test_through_the_zenml_deployment(zenml_home, gguf_cache, served, reference, two_adapters, tmp_path):
    """serve_pipeline deployed with engine: llama_cpp on 127.0.0.1: the OpenAI client gets the transformers engine's
    greedy answers per adapter, /invoke answers too; deleting the deployment stops its llama-server."""
    import requests
    import yaml
    from conftest import REPO_ROOT, default_stack_plus
    from zenml import save_artifact
    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.model.utils import link_artifact_version_to_model_version

    import materializers  # noqa: F401
    from core.artifacts import ModelFolder
    from pipelines.serve_pipeline import serve_pipeline

    client = Client()
    model_name = "serve-llamacpp-test"
    client.create_model(name=model_name)
    version = client.create_model_version(model_name_or_id=model_name)
    for name, path in zip(("adapter", "adapter_prices"), two_adapters):
        link_artifact_version_to_model_version(save_artifact(ModelFolder(path), name=name), version)
    stack_id, deployer = default_stack_plus(StackComponentType.DEPLOYER, "local", "local-deployer")
    name = f"lora-chat-llamacpp-{deployer.rsplit('-', 1)[-1]}"
    doc = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    doc["on_init_kwargs"]["config"].update(
        model_name=model_name, version=version.name, engine="llama_cpp", gguf_type="f16", parallel=2, **LIMITS
    )
    doc["settings"]["deployer.local"].update(port=None, generate_auth_key=True)
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)  # the server process imports the pipeline from its working directory
        mp.setenv("ZENML_ACTIVE_STACK_ID", stack_id)
        mp.setenv("ZENML_LOGGING_VERBOSITY", "INFO")  # the server's INFO records, where the child's output goes
        try:
            url = serve_pipeline.with_options(config_path=str(config_path)).deploy(deployment_name=name, timeout=60)
            url = url.url.rstrip("/")
            deadline = time.monotonic() + 180
            while True:  # the server listens once on_init has loaded the model and started llama-server
                try:
                    if requests.get(url + "/health", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "\n".join(client.get_deployment_logs(name, tail=60))
                time.sleep(0.5)
            assert url.startswith("http://127.0.0.1:")
            key = client.get_deployment(name).auth_key
            children = llama_servers(str(gguf_cache))
            assert len(children) == 2, children  # the module's engine, and the deployment's
            oa = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
            for adapter in ("default", "prices"):
                reply = oa.chat.completions.create(model=adapter, messages=user(QUESTIONS[0]), max_tokens=12,
                                                   temperature=0)  # fmt: skip
                assert reply.choices[0].message.content == greedy(reference, QUESTIONS[0], adapter, 12).text
            invoked = requests.post(url + "/invoke", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                    json={"parameters": {"prompt": QUESTIONS[0], "adapter": "prices", "max_new_tokens": 12}})  # fmt: skip
            assert invoked.json()["success"], invoked.text
            assert invoked.json()["outputs"]["answer"] == greedy(reference, QUESTIONS[0], "prices", 12).text.strip()
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
            logs = "\n".join(client.get_deployment_logs(name, tail=2000))
            assert "llama-server[" in logs  # the child's output is in the deployment's log
        finally:
            with contextlib.suppress(KeyError):
                client.delete_deployment(name, force=True)  # stops the server process
    deadline = time.monotonic() + 30
    while len(llama_servers(str(gguf_cache))) > 1:  # the deployment's child went with it
        assert time.monotonic() < deadline, llama_servers(str(gguf_cache))
        time.sleep(0.2)
