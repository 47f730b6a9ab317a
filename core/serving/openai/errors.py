"""Every error the OpenAI API answers: `OpenAIError` (a status and OpenAI's error body, built in one place, `body()`),
and `invalid_request`, which turns a request's pydantic ValidationError into a 400 naming the offending param.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from core.serving.openai.protocol import CHECK_FAILED, ErrorInfo, ErrorResponse


class OpenAIError(Exception):
    """An error answered in OpenAI's shape, with its HTTP status (and headers: Retry-After on 503, WWW-Authenticate on
    401)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type_=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`: the one place an error body is built."""
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    @property
    def headers(self) -> dict[str, str] | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status == 503:
            return {"Retry-After": "1"}
        return None


# What a value of pydantic's type errors should have been (strict types: "0.5" is not a number).
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}


def param_name(loc: tuple[str | int, ...]) -> str | None:
    """A pydantic error location as OpenAI names a param: ("messages", 1, "content") -> "messages[1].content"."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def invalid_request(err: ValidationError) -> OpenAIError:
    """400 invalid_request_error for the request's first fault: an unknown key first (as OpenAI), else the first error
    in the request model's field order."""
    errors = err.errors()
    unknown = sorted((e for e in errors if e["type"] == "extra_forbidden"), key=lambda e: param_name(e["loc"]) or "")
    first = (unknown or errors)[0]
    kind, ctx = first["type"], first.get("ctx") or {}
    param = ctx.get("param") or param_name(first["loc"])
    if param is None:
        return OpenAIError(400, "the request body must be a JSON object")
    got = f", got {_json(first.get('input'))}"
    if kind == "extra_forbidden":
        return OpenAIError(400, f"unrecognized request argument: {param}", param, "unknown_parameter")
    if kind == "missing":
        return OpenAIError(400, f"{param} is required", param, "missing_parameter")
    if kind in _EXPECTED:
        return OpenAIError(400, f"{param} must be {_EXPECTED[kind]}{got}", param, "invalid_type")
    if kind == "literal_error":
        return OpenAIError(400, f"{param} must be one of {ctx['expected']}{got}", param, "invalid_value")
    if kind == CHECK_FAILED:  # one of protocol.py's own checks: its message says where as {param}
        return OpenAIError(400, first["msg"].replace("{param}", param), param, "invalid_value")
    return OpenAIError(400, f"{param}: {first['msg']}{got}", param, "invalid_value")


def _json(value: Any) -> str:
    return json.dumps(value, default=str)
