"""What the OpenAI routes do, without HTTP: list the served models, and answer a chat completion request.

A chat completion goes through four steps:
1. `parse_chat_request`: the body is checked by the request model (core/serving/openai/protocol.py), then against
   the loaded model: is `model` a served name (404), do the messages, rendered as training rendered them
   (core.serving.model.conversation_ids), and the tokens asked for fit the context.
2. `submit`: its Generation goes to the server's one engine (core/serving/batching.py's BatchEngine, or
   core/serving/llamacpp_engine.py's LlamaCppEngine); a full queue, or llama-server restarting, is 503.
3. `whole_completion` waits for the end and answers one ChatCompletion, or `stream_chunks` sends each piece of text
   as it comes, as server-sent events in OpenAI's chunk format.
4. Either way, a request whose client went away leaves its batch (the generation is cancelled). A completion
   answered whole, or a stream that reached its finish chunk, is recorded in the request log
   (core/serving/completion_log.py).

core/serving/openai/routes.py turns the results into HTTP responses.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from core.serving import completion_log
from core.serving.batching import EngineStoppedError, EngineUnavailableError, Generation, QueueFullError
from core.serving.model import ServedModel, conversation_ids
from core.serving.openai.errors import OpenAIError, invalid_request
from core.serving.openai.protocol import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Limits,
    ModelCard,
    ModelList,
    Usage,
)


def list_models(served: ServedModel) -> ModelList:
    """GET /v1/models: every name a request may use as `model`."""
    created = int(served.info.get("loaded_at", time.time()))
    owner = f"{served.info.get('model_name', 'local')} v{served.info.get('model_version', '?')}"
    return ModelList(data=[ModelCard(id=name, created=created, owned_by=owner) for name in served.adapters])


@dataclass
class ChatJob:
    """A chat completion request that passed every check, with the Generation the batch engine works on."""

    request: ChatCompletionRequest
    generation: Generation
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)  # for the request log's latency

    def cancel_if_running(self) -> None:
        """The client went away (or we are done): a row still generating leaves its batch."""
        if self.generation.finish_reason is None:
            self.generation.cancel()


# ---------------------------------------------------------------------------------------------------------------
# 1. Checks
# ---------------------------------------------------------------------------------------------------------------


def parse_chat_request(served: ServedModel, body: Any) -> ChatJob:
    """Check a chat completion request against the loaded model; OpenAIError says what is wrong, and where."""
    request = validate_request(served, body)
    check_model(served, request.model)
    ids = conversation_ids(served, request.conversation(), request.model)
    generation = Generation(
        adapter=request.model,
        input_ids=ids,
        max_new_tokens=tokens_to_generate(served, request, len(ids)),
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        stop=request.stops,
        seed=request.seed,
    )
    return ChatJob(request, generation)


def validate_request(served: ServedModel, body: Any) -> ChatCompletionRequest:
    """The request model's checks, within this server's limits (ServeConfig); 400 naming the param."""
    cfg = served.config
    limits = Limits(max_temperature=cfg.max_temperature, max_tokens=cfg.max_new_tokens_limit)
    try:
        return ChatCompletionRequest.model_validate(body, context=limits)
    except ValidationError as err:
        raise invalid_request(err) from None


def check_model(served: ServedModel, model: str) -> None:
    if model not in served.adapters:
        raise OpenAIError(
            404,
            f"The model '{model}' does not exist here; models served: {', '.join(served.adapters)}",
            "model",
            "model_not_found",
        )


def tokens_to_generate(served: ServedModel, request: ChatCompletionRequest, prompt_tokens: int) -> int:
    """max_new_tokens: what the request asks for (else as many as the limit and the context allow), if it fits."""
    room = served.context_length - prompt_tokens
    context = (
        f"This model's maximum context length is {served.context_length} tokens; the messages take {prompt_tokens}"
    )
    if room < 1:
        raise OpenAIError(
            400, f"{context} (after the chat template). Shorten them.", "messages", "context_length_exceeded"
        )
    asked, name = request.requested_tokens, request.max_tokens_param
    if asked is None:
        return min(served.config.max_new_tokens_limit, room)
    if asked > room:
        raise OpenAIError(
            400,
            f"{context} and {name} asks for {asked} more. Shorten the messages or lower {name}.",
            "messages",
            "context_length_exceeded",
        )
    return asked


# ---------------------------------------------------------------------------------------------------------------
# 2. Generation
# ---------------------------------------------------------------------------------------------------------------


def submit(served: ServedModel, job: ChatJob) -> asyncio.Queue:
    """Hand the job to the batch engine. Its events, ("delta", text), then ("done", finish_reason) or ("error",
    message), come from the engine's thread onto the returned queue, on this event loop."""
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the server's loop is gone (shutdown)
            job.generation.cancel()

    job.generation.sink = sink
    try:
        served.engine.submit(job.generation)
    except QueueFullError as err:
        raise OpenAIError(503, str(err), code="server_overloaded") from None
    except EngineStoppedError as err:
        raise OpenAIError(503, str(err), code="server_stopping") from None
    except EngineUnavailableError as err:
        raise OpenAIError(503, str(err), code="engine_unavailable") from None
    return events


def failure(kind: str, message: str) -> OpenAIError:
    """An engine's ("error" | "unavailable", message) event as the error answered: 500, or 503 (retry: the llama.cpp
    engine's child went down and is restarting)."""
    if kind == "unavailable":
        return OpenAIError(503, message, code="engine_unavailable")
    return OpenAIError(500, message, code="generation_failed")


# ---------------------------------------------------------------------------------------------------------------
# 3. Answers
# ---------------------------------------------------------------------------------------------------------------


def completion(job: ChatJob) -> ChatCompletion:
    gen = job.generation
    choice = Choice(message=AssistantMessage(content=gen.text), finish_reason=gen.finish_reason)
    return ChatCompletion(id=job.id, created=job.created, model=job.request.model, choices=[choice], usage=usage(job))


def usage(job: ChatJob) -> Usage:
    return Usage.of(len(job.generation.input_ids), job.generation.generated)


def chunk(job: ChatJob, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
    choice = ChunkChoice(delta=delta, finish_reason=finish)
    return ChatCompletionChunk(id=job.id, created=job.created, model=job.request.model, choices=[choice])


async def whole_completion(job: ChatJob, events: asyncio.Queue) -> ChatCompletion:
    """Wait for the end of the generation; OpenAIError 500 if it failed, 503 if the engine went down meanwhile."""
    try:
        while True:
            kind, value = await events.get()
            if kind in ("error", "unavailable"):
                raise failure(kind, value)
            if kind == "done":
                return completion(job)
    finally:
        job.cancel_if_running()  # the request was dropped while generating


async def first_event(job: ChatJob, events: asyncio.Queue) -> tuple[str, Any]:
    """The generation's first event, before a stream starts: a failure before any text is still an HTTP error
    (a 503 the client can retry) rather than an error inside a 200 stream."""
    kind, value = await events.get()
    if kind in ("error", "unavailable"):
        job.cancel_if_running()
        raise failure(kind, value)
    return kind, value


async def stream_chunks(
    job: ChatJob, events: asyncio.Queue, first: tuple[str, Any], on_done: Callable[[], None] = lambda: None
) -> AsyncIterator[str]:
    """Server-sent events: the role, each piece of text, the finish reason (then the usage if asked), [DONE].
    `on_done` runs once the finish chunk is sent (not after an error or a client that went away)."""
    try:
        yield event(chunk(job, Delta(role="assistant", content="")))
        kind, value = first
        while True:
            if kind == "delta":
                yield event(chunk(job, Delta(content=value)))
            elif kind in ("error", "unavailable"):
                yield event(failure(kind, value).body())
                break
            else:
                yield event(chunk(job, Delta(), finish=value))
                on_done()
                if job.request.include_usage:
                    yield event(chunk(job, Delta()).model_copy(update={"choices": [], "usage": usage(job)}))
                break
            kind, value = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancel_if_running()


def event(payload: BaseModel | dict) -> str:
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data)}\n\n"


async def create_chat_completion(served: ServedModel, body: Any) -> ChatCompletion | AsyncIterator[str]:
    """POST /v1/chat/completions: a ChatCompletion, or (`stream: true`) the server-sent events to send.
    OpenAIError for a request refused before generation, or a generation that failed (when not streaming)."""
    job = parse_chat_request(served, body)
    events = submit(served, job)
    if job.request.stream:
        first = await first_event(job, events)
        return stream_chunks(job, events, first, lambda: completion_log.record_chat(served, job, stream=True))
    answer = await whole_completion(job, events)
    completion_log.record_chat(served, job, stream=False)
    return answer
