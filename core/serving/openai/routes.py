"""OpenAI-compatible endpoints on the serving deployment: `GET /v1/models`, `POST /v1/chat/completions`.

Registered as custom endpoints of the ZenML deployment (pipelines/serve_pipeline.py), next to ZenML's own `/invoke`. Any OpenAI client
works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<the deployment's auth key, or any text>")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Can I return boots?"}])

- `model` is an adapter name from `/v1/models` (`default`, a task name, `base`, or `merged`).
- `messages` (system, user and assistant turns, the last one from the user) are rendered with the chat template and
  system prompt training used (core.serving.model.conversation_ids); a request's own system message replaces the
  configured one.
- `max_tokens` (or `max_completion_tokens`), `temperature` (default 1, as OpenAI; 0: greedy), `top_p`, `stop`
  (up to 4 strings), `seed`, `stream` (server-sent events in OpenAI's chunk format, `stream_options.include_usage`).
- Requests are generated in batches by core.serving.batching.BatchEngine; a full queue answers 503 with Retry-After.
- Errors keep OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the matching status.
- Access: when the deployment has an auth key (ZenML deployer setting `auth_key` / `generate_auth_key`), every
  request must carry it as the bearer token (the client's `api_key`): otherwise 401, before any model work. A
  deployment without a key answers only requests that reach it on a loopback address.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here

from core.serving.batching import EngineStoppedError, Generation, QueueFullError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Accepted and ignored: they do not change what is generated.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Accepted only at their no-op value; anything else is an error rather than silently ignored.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "logit_bias": {}, "tools": []}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed"}
KNOWN |= {"stream", "stream_options", "tool_choice", "response_format", *IGNORED, *NEUTRAL}
MAX_STOP = 4  # stop strings per request, as OpenAI


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type_=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatCompletionRequest:
    """A /v1/chat/completions request that passed every check."""

    generation: Generation
    model: str
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OpenAIError(400, f"{name} must be a number, got {json.dumps(value)}", name, "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        bounds = f"{'above' if low_open else 'at least'} {low} and at most {high}"
        raise OpenAIError(400, f"{name} must be {bounds}, got {value}", name, "invalid_value")
    return float(value)


def _content(message: Any, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(
                    400, f"{where}.content[{k}]: only text parts are supported", f"{where}.content", "invalid_value"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise OpenAIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(400, f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise OpenAIError(
                400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}", f"{where}.role"
            )
        if role == "system" and i > 0:
            raise OpenAIError(400, f"{where}: a system message may only come first", f"{where}.role")
        text = _content(message, where)
        if role != "system" and not text.strip():
            raise OpenAIError(400, f"{where}.content must not be empty", f"{where}.content")
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise OpenAIError(400, "the last message must come from the user", f"messages[{len(out) - 1}].role")
    return out


def parse_chat_request(served, body: Any) -> ChatCompletionRequest:
    """Check a chat completion request against the loaded model; OpenAIError says what is wrong, and where."""
    from core.serving.model import conversation_ids

    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise OpenAIError(400, f"unrecognized request argument: {unknown[0]}", unknown[0], "unknown_parameter")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise OpenAIError(400, f"{name}={json.dumps(body[name])} is not supported by this server", name)
    for name in ("tool_choice", "response_format"):
        if body.get(name) not in (None, "none", "auto", {"type": "text"}):
            raise OpenAIError(400, f"{name} is not supported by this server (plain text only)", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model is required: one of the names GET /v1/models lists", "model")
    if model not in served.adapters:
        raise OpenAIError(
            404,
            f"The model '{model}' does not exist here; models served: {', '.join(served.adapters)}",
            "model",
            "model_not_found",
        )
    messages = _messages(body)
    cfg = served.config
    temperature = _number(body, "temperature", 1.0, 0, cfg.max_temperature)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop)
    ):
        raise OpenAIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIError(400, f"seed must be an integer, got {json.dumps(seed)}", "seed")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise OpenAIError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise OpenAIError(400, "stream_options must be an object", "stream_options")

    ids = conversation_ids(served, messages, model)
    room = served.context_length - len(ids)
    if room < 1:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {served.context_length} tokens; the messages take {len(ids)} "
            "(after the chat template). Shorten them.",
            "messages",
            "context_length_exceeded",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = cfg.max_new_tokens_limit
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(limit, room)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise OpenAIError(400, f"{key} must be an integer from 1 to {limit}, got {json.dumps(max_tokens)}", key)
    elif max_tokens > room:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {served.context_length} tokens; the messages take {len(ids)} "
            f"and {key} asks for {max_tokens} more. Shorten the messages or lower {key}.",
            "messages",
            "context_length_exceeded",
        )
    generation = Generation(
        adapter=model,
        input_ids=ids,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=list(stop or []),
        seed=seed,
    )
    return ChatCompletionRequest(generation, model, stream, bool(options.get("include_usage")))


def list_models(served) -> dict:
    created = int(served.info.get("loaded_at", time.time()))
    owner = f"{served.info.get('model_name', 'local')} v{served.info.get('model_version', '?')}"
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": owner} for name in served.adapters],
    }


def _usage(gen: Generation) -> dict:
    return {
        "prompt_tokens": len(gen.input_ids),
        "completion_tokens": len(gen.tokens),
        "total_tokens": len(gen.input_ids) + len(gen.tokens),
    }


def completion(request: ChatCompletionRequest, completion_id: str, created: int) -> dict:
    gen = request.generation
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "finish_reason": gen.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(gen),
    }


def chunk(request: ChatCompletionRequest, completion_id: str, created: int, delta: dict, finish=None) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": request.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


# ---------------------------------------------------------------------------------------------------------------
# The HTTP side: the handlers the deployment's FastAPI app serves (ZenML custom endpoints)
# ---------------------------------------------------------------------------------------------------------------


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_access(auth_key: str | None, authorization: str | None, server_host: str | None) -> None:
    """401 unless the bearer token is the deployment's key; without a key, only requests that came in on loopback."""
    if auth_key:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), auth_key.encode()):
            what = "No API key provided" if not authorization else "Incorrect API key provided"
            raise OpenAIError(
                401,
                f"{what}: send the deployment's auth key as the bearer token (the OpenAI client's api_key); "
                "`zenml deployment describe <name> --show-secret` shows it",
                code="invalid_api_key",
            )
    elif not _loopback(server_host):
        raise OpenAIError(
            401,
            "this deployment has no auth key but was reached on a non-loopback address: deploy it with the deployer "
            "setting generate_auth_key: true (or auth_key) before exposing it",
            code="auth_key_required",
        )


def _served_model():
    from zenml.steps.step_context import get_or_create_run_context

    from core.serving.model import ServedModel

    try:
        state = get_or_create_run_context().state
    except RuntimeError:
        state = None
    if not isinstance(state, ServedModel):
        raise OpenAIError(503, "the model is still loading; retry in a few seconds", code="model_loading")
    return state


def _deployment_key(app_runner):
    return lambda: getattr(app_runner.deployment, "auth_key", None)


def models_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `GET /v1/models` (pipelines/serve_pipeline.py's custom_endpoints)."""
    return handlers(_deployment_key(app_runner), _served_model)[0]


def chat_completions_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `POST /v1/chat/completions`."""
    return handlers(_deployment_key(app_runner), _served_model)[1]


def add_routes(app, auth_key, served_model) -> None:
    """Both routes on a FastAPI `app` (what the deployment registers, without ZenML around it: tests)."""
    models, chat_completions = handlers(auth_key, served_model)
    app.get("/v1/models")(models)
    app.post("/v1/chat/completions")(chat_completions)


def handlers(auth_key, served_model):
    """(models, chat_completions) request handlers; `auth_key()` and `served_model()` are read per request."""
    from fastapi.responses import JSONResponse, StreamingResponse

    def error_response(err: OpenAIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def admit(request: Request):
        server = request.scope.get("server") or (None, None)
        check_access(auth_key(), request.headers.get("authorization"), server[0])
        return served_model()

    async def models(request: Request):
        try:
            return JSONResponse(list_models(admit(request)))
        except OpenAIError as err:
            return error_response(err)

    async def chat_completions(request: Request):
        try:
            served = admit(request)
            try:
                body = await request.json()
            except ValueError:
                raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None
            parsed = parse_chat_request(served, body)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def sink(kind: str, value: Any) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (kind, value))
                except RuntimeError:  # the server's loop is gone (shutdown)
                    parsed.generation.cancel()

            parsed.generation.sink = sink
            try:
                served.engine.submit(parsed.generation)
            except QueueFullError as err:
                raise OpenAIError(503, str(err), code="server_overloaded") from None
            except EngineStoppedError as err:
                raise OpenAIError(503, str(err), code="server_stopping") from None
        except OpenAIError as err:
            if err.status >= 500 or err.status == 401:
                logger.info("chat completion refused: %s %s", err.status, err.code)
            return error_response(err)

        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not parsed.stream:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "error":
                        return error_response(OpenAIError(500, value, code="generation_failed"))
                    if kind == "done":
                        return JSONResponse(completion(parsed, completion_id, created))
            finally:
                if parsed.generation.finish_reason is None:
                    parsed.generation.cancel()  # the request was dropped while generating

        async def stream():
            try:
                first = chunk(parsed, completion_id, created, {"role": "assistant", "content": ""})
                yield f"data: {json.dumps(first)}\n\n"
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        yield f"data: {json.dumps(chunk(parsed, completion_id, created, {'content': value}))}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps(OpenAIError(500, value, code='generation_failed').body())}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(chunk(parsed, completion_id, created, {}, value))}\n\n"
                        if parsed.include_usage:
                            tail = chunk(parsed, completion_id, created, {}) | {"usage": _usage(parsed.generation)}
                            tail["choices"] = []
                            yield f"data: {json.dumps(tail)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): a row still generating leaves its batch
                if parsed.generation.finish_reason is None:
                    parsed.generation.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return models, chat_completions
