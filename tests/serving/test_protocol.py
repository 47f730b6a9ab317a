"""The OpenAI request and answer models (core/serving/openai/protocol.py) and the 400s their errors become
(core/serving/openai/errors.py), without a model: every check here needs none. test_openai_api.py sends the same
kinds of requests through the routes to a loaded model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.serving.openai.errors import OpenAIError, invalid_request
from core.serving.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    Limits,
    ModelCard,
    ModelList,
    Usage,
)

LIMITS = Limits(max_temperature=2.0, max_tokens=32)
USER = [{"role": "user", "content": "What is the code for item 3?"}]


def refusal(body) -> OpenAIError:
    """The OpenAIError a request body gets from validation (and that it is refused at all)."""
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body, context=LIMITS)
    return invalid_request(caught.value)


def bad(change: dict) -> OpenAIError:
    return refusal({"model": "default", "messages": USER} | change)


def assert_400(err: OpenAIError, param: str, *said: str) -> None:
    body = err.body()["error"]
    assert err.status == 400 and set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == "invalid_request_error" and body["param"] == param, body
    for text in said:
        assert text in body["message"], body


def test_an_unknown_key_is_refused_by_name_before_anything_else():
    err = bad({"best_of": 2})
    assert_400(err, "best_of", "unrecognized request argument: best_of")
    assert err.code == "unknown_parameter"
    # several faults: the unknown key is named (the first in sorted order), not the bad temperature
    assert_400(bad({"zeta": 1, "best_of": 2, "temperature": 9}), "best_of", "unrecognized request argument: best_of")
    # also when null, and inside a nested object that forbids extras
    assert_400(bad({"top_k": None}), "top_k", "unrecognized request argument: top_k")
    assert_400(bad({"response_format": {"type": "text", "schema": {}}}), "response_format", "not supported")


@pytest.mark.parametrize(
    "change, param, said",
    [
        ({"temperature": "hot"}, "temperature", "temperature must be a number"),
        ({"temperature": True}, "temperature", "temperature must be a number"),
        ({"temperature": -0.1}, "temperature", "at least 0 and at most 2.0"),
        ({"temperature": 3}, "temperature", "at most 2.0"),
        ({"top_p": 0}, "top_p", "above 0"),
        ({"top_p": 1.5}, "top_p", "at most 1"),
        ({"top_p": "0.5"}, "top_p", "top_p must be a number"),
        ({"max_tokens": 0}, "max_tokens", "must be an integer from 1 to 32"),
        ({"max_tokens": 1000}, "max_tokens", "must be an integer from 1 to 32"),
        ({"max_tokens": 1.5}, "max_tokens", "max_tokens must be an integer"),
        ({"max_tokens": True}, "max_tokens", "max_tokens must be an integer"),
        ({"max_completion_tokens": 33}, "max_completion_tokens", "must be an integer from 1 to 32"),
        ({"n": 2}, "n", "n=2 is not supported"),
        ({"n": "1"}, "n", "n must be an integer"),
        ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty=0.5 is not supported"),
        ({"logprobs": True}, "logprobs", "logprobs=true is not supported"),
        ({"tools": [{"type": "function"}]}, "tools", "is not supported"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"stop": ""}, "stop", "non-empty string"),
        ({"stop": ["a", ""]}, "stop", "non-empty string"),
        ({"stop": 5}, "stop", "stop must be a non-empty string or a list"),
        ({"seed": 1.5}, "seed", "seed must be an integer"),
        ({"stream": "yes"}, "stream", "stream must be true or false"),
        ({"stream_options": []}, "stream_options", "stream_options must be an object"),
        ({"tool_choice": "required"}, "tool_choice", "plain text only"),
        ({"response_format": {"type": "json_object"}}, "response_format", "plain text only"),
        ({"model": ""}, "model", "model is required"),
        ({"model": 7}, "model", "model must be a string"),
    ],
)
def test_wrong_types_and_ranges_name_the_param(change, param, said):
    assert_400(bad(change), param, said)


@pytest.mark.parametrize(
    "messages, param, said",
    [
        ([], "messages", "messages must be a non-empty list"),
        ("hi", "messages", "messages must be a list"),
        ([5], "messages[0]", "messages[0] must be an object"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role", "messages[0].role must be one of"),
        ([{"role": "user"}], "messages[0].content", "messages[0].content is required"),
        ([{"role": "user", "content": 5}], "messages[0].content", "a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content", "list of text parts"),
        ([{"role": "user", "content": " "}], "messages[0].content", "must not be empty"),
        ([*USER, {"role": "system", "content": "Be brief."}, *USER], "messages[1].role", "may only come first"),
        ([*USER, {"role": "assistant", "content": "A3."}], "messages[1].role", "last message must come from the user"),
    ],
)
def test_bad_messages_name_the_message(messages, param, said):
    assert_400(bad({"messages": messages}), param, said)


def test_a_body_that_is_no_object_or_lacks_a_field():
    err = refusal([USER])
    assert err.status == 400 and err.param is None and "must be a JSON object" in err.message
    assert_400(refusal({"messages": USER}), "model", "model is required")


def test_the_limits_come_from_the_context():
    body = {"model": "default", "messages": USER, "temperature": 2.5, "max_tokens": 1000}
    loose = ChatCompletionRequest.model_validate(body, context=Limits(max_temperature=3.0, max_tokens=None))
    assert loose.temperature == 2.5 and loose.requested_tokens == 1000
    assert_400(refusal(body | {"max_tokens": 4}), "temperature", "at most 2.0")
    assert_400(refusal(body | {"temperature": 1}), "max_tokens", "from 1 to 32")
    # without a context: OpenAI's own temperature range, and no token limit but the context length's (checked later)
    assert_400(invalid_request(_errors(body)), "temperature", "at most 2.0")
    assert ChatCompletionRequest.model_validate(body | {"temperature": 1}).requested_tokens == 1000


def _errors(body) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    return caught.value


def test_a_valid_request_round_trips():
    body = {
        "model": "prices",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "item 3?"}]},
            {"role": "assistant", "content": "Which code?"},
            {"role": "user", "content": "Its code."},
        ],
        "max_completion_tokens": 12,
        "temperature": 0,
        "top_p": 0.9,
        "stop": ["\n\n", "###"],
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "presence_penalty": 0,
        "logprobs": False,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "user": "someone",
        "metadata": {"team": "support"},
    }
    request = ChatCompletionRequest.model_validate(body, context=LIMITS)
    assert request.model_dump(exclude_unset=True) == body
    again = ChatCompletionRequest.model_validate_json(request.model_dump_json(exclude_unset=True), context=LIMITS)
    assert again == request
    assert request.conversation()[1] == {"role": "user", "content": "What is item 3?"}
    assert request.stops == ["\n\n", "###"] and request.include_usage and request.stream
    assert (request.requested_tokens, request.max_tokens_param) == (12, "max_completion_tokens")
    # null is "not given", and a message's extra keys (name) are accepted
    plain = ChatCompletionRequest.model_validate(
        {"model": "default", "messages": [USER[0] | {"name": "ann"}], "temperature": None, "stop": "\n"}
    )
    assert plain.temperature is None and plain.stops == ["\n"] and not plain.include_usage
    assert (plain.requested_tokens, plain.max_tokens_param) == (None, "max_tokens")


def test_answers_keep_openai_shapes():
    usage = Usage.of(10, 3)
    assert usage.total_tokens == 13
    done = ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "created": 1,
            "model": "default",
            "choices": [{"message": {"content": "A3."}, "finish_reason": "stop"}],
            "usage": usage.model_dump(),
        }
    ).model_dump()
    assert done["object"] == "chat.completion" and done["choices"][0]["message"] == {
        "role": "assistant",
        "content": "A3.",
    }
    assert done["choices"][0]["logprobs"] is None and done["choices"][0]["index"] == 0
    piece = ChatCompletionChunk(id="c", created=1, model="default", choices=[ChunkChoice(delta=Delta(content="A"))])
    assert piece.model_dump()["choices"][0]["delta"] == {"content": "A"} and "usage" not in piece.model_dump()
    last = piece.model_copy(update={"choices": [ChunkChoice(delta=Delta(), finish_reason="length")]}).model_dump()
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    counted = piece.model_copy(update={"choices": [], "usage": usage}).model_dump()
    assert counted["choices"] == [] and counted["usage"]["completion_tokens"] == 3
    models = ModelList(data=[ModelCard(id="default", created=1, owned_by="m v1")]).model_dump()
    assert models == {
        "object": "list",
        "data": [{"id": "default", "object": "model", "created": 1, "owned_by": "m v1"}],
    }


def test_every_error_has_one_shape():
    for err in (OpenAIError(401, "no key", code="invalid_api_key"), OpenAIError(503, "busy"), bad({"n": 3})):
        assert set(err.body()) == {"error"} and set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert OpenAIError(503, "busy").body()["error"]["type"] == "server_error"
    assert OpenAIError(503, "busy").headers == {"Retry-After": "1"}
    assert OpenAIError(401, "no key").headers == {"WWW-Authenticate": "Bearer"}
