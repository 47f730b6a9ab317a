"""OpenAI-compatible endpoints on the serving deployment: `GET /v1/models`, `POST /v1/chat/completions`, and the
feedback routes on its request log: `POST /v1/feedback`, `GET /v1/feedback`, `GET /v1/feedback/stats`.

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

This module holds the HTTP side only: the access check and the route handlers (`OpenAIRoutes`). The shapes are
protocol.py's, the errors errors.py's, and what each route does service.py's (chat) and feedback.py's (feedback).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core.serving.openai import feedback
from core.serving.openai.errors import OpenAIError
from core.serving.openai.protocol import ChatCompletion
from core.serving.openai.service import create_chat_completion, list_models

logger = logging.getLogger(__name__)


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


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None


@dataclass
class OpenAIRoutes:
    """The route handlers; `auth_key()` and `served_model()` are read per request (the key may be set after
    the app is built, the model loads after the server starts)."""

    auth_key: Callable[[], str | None]
    served_model: Callable[[], Any]  # a core.serving.model.ServedModel, or OpenAIError 503 while loading

    def admit(self, request: Request):
        """The loaded model, once the request has shown the key (401 before any model work)."""
        server = request.scope.get("server") or (None, None)
        check_access(self.auth_key(), request.headers.get("authorization"), server[0])
        return self.served_model()

    async def models(self, request: Request) -> Response:
        """GET /v1/models"""
        try:
            return JSONResponse(list_models(self.admit(request)).model_dump())
        except OpenAIError as err:
            return error_response(err)

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions: admit, read the body, answer it whole or as a stream of chunks."""
        try:
            answer = await create_chat_completion(self.admit(request), await read_json(request))
        except OpenAIError as err:
            if err.status >= 500 or err.status == 401:
                logger.info("chat completion refused: %s %s", err.status, err.code)
            return error_response(err)
        if isinstance(answer, ChatCompletion):
            return JSONResponse(answer.model_dump())
        return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def post_feedback(self, request: Request) -> Response:
        """POST /v1/feedback: 200 only once the feedback is committed."""
        try:
            record = await feedback.post_feedback(self.admit(request), await read_json(request))
            return JSONResponse(record.model_dump(mode="json"))
        except OpenAIError as err:
            return error_response(err)

    async def list_feedback(self, request: Request) -> Response:
        """GET /v1/feedback?since=&until=&version=&rating=&limit="""
        try:
            rows = await feedback.list_feedback(self.admit(request), dict(request.query_params))
            return JSONResponse(rows.model_dump(mode="json"))
        except OpenAIError as err:
            return error_response(err)

    async def feedback_stats(self, request: Request) -> Response:
        """GET /v1/feedback/stats"""
        try:
            return JSONResponse(feedback.request_log_stats(self.admit(request)))
        except OpenAIError as err:
            return error_response(err)


def add_routes(app, auth_key: Callable[[], str | None], served_model: Callable[[], Any]) -> None:
    """Every route on a FastAPI `app` (what the deployment registers, without ZenML around it: tests)."""
    routes = OpenAIRoutes(auth_key, served_model)
    app.get("/v1/models")(routes.models)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/feedback")(routes.post_feedback)
    app.get("/v1/feedback")(routes.list_feedback)
    app.get("/v1/feedback/stats")(routes.feedback_stats)


# ---------------------------------------------------------------------------------------------------------------
# On the ZenML deployment: the routes as custom endpoints (pipelines/serve_pipeline.py)
# ---------------------------------------------------------------------------------------------------------------


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


def deployment_routes(app_runner) -> OpenAIRoutes:
    """The routes over a ZenML deployment: its auth key, and the model its on_init hook loaded."""
    return OpenAIRoutes(lambda: getattr(app_runner.deployment, "auth_key", None), _served_model)


def models_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `GET /v1/models` (pipelines/serve_pipeline.py's custom_endpoints)."""
    return deployment_routes(app_runner).models


def chat_completions_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `POST /v1/chat/completions`."""
    return deployment_routes(app_runner).chat_completions


def post_feedback_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `POST /v1/feedback`."""
    return deployment_routes(app_runner).post_feedback


def list_feedback_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `GET /v1/feedback`."""
    return deployment_routes(app_runner).list_feedback


def feedback_stats_endpoint(app_runner, **_: Any):
    """ZenML endpoint builder for `GET /v1/feedback/stats`."""
    return deployment_routes(app_runner).feedback_stats
