"""The OpenAI API's shapes this server speaks, as pydantic models: the chat completion request, and the completion,
chunk, model list and error body it answers with.

The request model holds every check that needs no loaded model: unknown keys are refused (`extra="forbid"`),
types are strict (no "0.5" for a number), ranges are OpenAI's narrowed by this server's `Limits` (ServeConfig's
max_temperature and max_new_tokens_limit, passed as the validation context). What needs the model (is `model` one
of the served names, do the messages fit the context) is checked by core/serving/openai/service.py.

A check of ours raises `PydanticCustomError` with a message that says `{param}` where the error is (errors.py
fills it in from the error's location, or the check names it in the error's context). JSON `null` means "not
given", as in OpenAI's API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # stop strings per request, as OpenAI
DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults
DEFAULT_TOP_P = 1.0
MODEL_REQUIRED = "{param} is required: one of the names GET /v1/models lists"
STOP_ERROR = f"{{param}} must be a non-empty string or a list of up to {MAX_STOP} of them"
PLAIN_TEXT_ONLY = "{param} is not supported by this server (plain text only)"
CHECK_FAILED = "invalid_value"  # the error type of this module's own checks (errors.py reads their message as is)


@dataclass(frozen=True)
class Limits:
    """This server's bounds on a request (ServeConfig), given to validation as its context."""

    max_temperature: float = 2.0  # OpenAI's
    max_tokens: int | None = None  # None: only the context length bounds it (checked against the model)


def _limits(info: ValidationInfo) -> Limits:
    return info.context if isinstance(info.context, Limits) else Limits()


def _invalid(message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(CHECK_FAILED, message, context or None)


# ---------------------------------------------------------------------------------------------------------------
# Checks of single fields
# ---------------------------------------------------------------------------------------------------------------


def one_error(message: str) -> WrapValidator:
    """Any error of the annotated type is this one error (a union would report one per member, with their tags)."""

    def check(value: Any, handler):
        try:
            return handler(value)
        except ValidationError:
            raise _invalid(message) from None

    return WrapValidator(check)


def only(neutral: Any) -> AfterValidator:
    """Accepted only at its no-op value; anything else is refused rather than silently ignored."""

    def check(value: Any) -> Any:
        if value is not None and value != neutral:
            raise _invalid("{param}={value} is not supported by this server", value=json.dumps(value))
        return value

    return AfterValidator(check)


def _model_name(value: str) -> str:
    if not value:
        raise _invalid(MODEL_REQUIRED)
    return value


def _temperature(value: float | None, info: ValidationInfo) -> float | None:
    high = _limits(info).max_temperature
    if value is not None and not 0 <= value <= high:
        raise _invalid("{param} must be at least 0 and at most {high}, got {value}", high=high, value=value)
    return value


def _top_p(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise _invalid("{param} must be above 0 and at most 1, got {value}", value=value)
    return value


def _max_tokens(value: int | None, info: ValidationInfo) -> int | None:
    high = _limits(info).max_tokens
    if value is not None and (value < 1 or (high is not None and value > high)):
        bounds = f"from 1 to {high}" if high is not None else "of at least 1"
        raise _invalid("{param} must be an integer {bounds}, got {value}", bounds=bounds, value=value)
    return value


def _stop(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOP or not all(stops):
        raise _invalid(STOP_ERROR)
    return value


# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------


class OpenAIModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(OpenAIModel):
    """One part of a message's content given as a list: text only (no images, audio, files)."""

    model_config = ConfigDict(extra="ignore")  # e.g. cache_control: no effect here

    type: Literal["text"]
    text: str


class Message(OpenAIModel):
    """A system, user or assistant turn."""

    model_config = ConfigDict(extra="ignore")  # e.g. `name`: no effect on the prompt

    role: Literal["system", "user", "assistant"]
    content: Annotated[str | list[TextPart], one_error("{param} must be a string or a list of text parts (text only)")]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


def _conversation(messages: list[Message]) -> list[Message]:
    """System first if at all, no empty turn, the user's turn last: what the chat template renders."""
    if not messages:
        raise _invalid("{param} must be a non-empty list of role/content objects")
    for i, message in enumerate(messages):
        if message.role == "system" and i > 0:
            raise _invalid("{param}: a system message may only come first", param=f"messages[{i}].role")
        if message.role != "system" and not message.text.strip():
            raise _invalid("{param} must not be empty", param=f"messages[{i}].content")
    if messages[-1].role != "user":
        raise _invalid("{param}: the last message must come from the user", param=f"messages[{len(messages) - 1}].role")
    return messages


class StreamOptions(OpenAIModel):
    model_config = ConfigDict(extra="ignore")  # e.g. include_obfuscation: nothing to obfuscate here

    include_usage: bool | None = None  # a last chunk with the token counts


class ResponseFormat(OpenAIModel):
    type: Literal["text"]


class ChatCompletionRequest(OpenAIModel):
    """POST /v1/chat/completions. Validate with `context=Limits(...)` for this server's bounds."""

    model: Annotated[str, AfterValidator(_model_name)]
    messages: Annotated[list[Message], AfterValidator(_conversation)]
    # What is generated
    max_tokens: Annotated[int | None, AfterValidator(_max_tokens)] = None  # None: up to the limit that fits
    max_completion_tokens: Annotated[int | None, AfterValidator(_max_tokens)] = None  # wins over max_tokens
    temperature: Annotated[float | None, AfterValidator(_temperature)] = None  # 0: greedy
    top_p: Annotated[float | None, AfterValidator(_top_p)] = None
    stop: Annotated[str | list[str] | None, one_error(STOP_ERROR), AfterValidator(_stop)] = None
    seed: int | None = None
    # How it is sent
    stream: bool | None = None  # server-sent events, one chunk per piece of text
    stream_options: StreamOptions | None = None
    # Accepted only at their no-op value
    n: Annotated[int | None, only(1)] = None
    presence_penalty: Annotated[float | None, only(0)] = None
    frequency_penalty: Annotated[float | None, only(0)] = None
    logprobs: Annotated[bool | None, only(False)] = None
    logit_bias: Annotated[dict[str, float] | None, only({})] = None
    tools: Annotated[list[dict[str, Any]] | None, only([])] = None
    tool_choice: Annotated[Literal["none", "auto"] | None, one_error(PLAIN_TEXT_ONLY)] = None
    response_format: Annotated[ResponseFormat | None, one_error(PLAIN_TEXT_ONLY)] = None
    # Accepted and ignored, whatever they hold: they do not change what is generated
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None

    @property
    def max_tokens_param(self) -> str:
        """The name the request gave its token limit under (errors name it)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as core.prompts renders them: [{role, content}] with the content as one string."""
        return [{"role": m.role, "content": m.text} for m in self.messages]


# ---------------------------------------------------------------------------------------------------------------
# The answers
# ---------------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds: the role (first chunk), a piece of text, or nothing (the last chunks)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_is_there(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only on the usage chunk (stream_options.include_usage), whose choices are []

    @model_serializer(mode="wrap")
    def _usage_only_when_counted(self, handler) -> dict:
        out = handler(self)
        if out.get("usage") is None:
            out.pop("usage", None)
        return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str  # invalid_request_error (4xx) or server_error (5xx)
    param: str | None = None  # the request field at fault, as "messages[1].content"
    code: str | None = None  # e.g. model_not_found, context_length_exceeded, invalid_api_key


class ErrorResponse(BaseModel):
    """Every error body: built in one place, core.serving.openai.errors.OpenAIError.body()."""

    error: ErrorInfo


# ---------------------------------------------------------------------------------------------------------------
# Feedback (core/serving/openai/feedback.py): not OpenAI's API, but in its style and error shape
# ---------------------------------------------------------------------------------------------------------------

RATING_ERROR = '{param} must be "up", "down" or an integer score from 1 to 5'


def _rating(value: str | int) -> str | int:
    if isinstance(value, int) and not 1 <= value <= 5:
        raise _invalid(RATING_ERROR)
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise _invalid("{param} must not be empty")
    return value


class FeedbackRequest(OpenAIModel):
    """POST /v1/feedback: a rating of a completion this deployment answered, and maybe the answer it should have been.
    One per (completion_id, source): sending it again updates it."""

    completion_id: Annotated[str, AfterValidator(_not_blank)]  # the `id` of the chat completion (or /invoke run id)
    rating: Annotated[Literal["up", "down"] | int, one_error(RATING_ERROR), AfterValidator(_rating)]
    correction: str | None = None  # the answer it should have been
    comment: str | None = None
    source: Annotated[str, AfterValidator(_not_blank)] = "api"  # who rates: a review tool, an app, a user id

    def fields(self) -> dict[str, Any]:
        """The feedback columns (core/feedback/store.py): a word goes to `rating`, a number to `score`."""
        word = isinstance(self.rating, str)
        return dict(
            rating=self.rating if word else None,
            score=None if word else self.rating,
            correction=self.correction,
            comment=self.comment,
        )


class FeedbackQuery(BaseModel):
    """GET /v1/feedback's query: updated in [since, until), the served version, the rating; at most `limit` rows."""

    model_config = ConfigDict(extra="forbid")  # query strings: not strict ("5" is a number here)

    since: datetime | None = None
    until: datetime | None = None
    version: str | None = None
    rating: Literal["up", "down"] | None = None
    limit: Annotated[int, Field(ge=1, le=10000)] = 1000


class CompletionRecord(BaseModel):
    id: str
    created_at: datetime
    endpoint: str
    model: str
    version: str
    adapter: str
    messages: list[dict[str, Any]]
    answer: str
    sampling: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    stream: bool


class FeedbackRecord(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: int
    completion_id: str
    source: str
    rating: str | None
    score: int | None
    correction: str | None
    comment: str | None
    created_at: datetime
    updated_at: datetime
    completion: CompletionRecord | None = None  # GET /v1/feedback: what was asked and answered


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackRecord]
