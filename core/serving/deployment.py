"""The serving deployment's server side: the `on_init` hook that loads the model once, and the deployment
service that checks each request against the loaded model before ZenML starts a run for it.

Used by pipelines/serve_pipeline.py (`on_init=load_server_state`, `on_cleanup=stop_server_state`,
`deployment_service_class=ChatDeploymentService`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from zenml.deployers.server.service import PipelineDeploymentService
from zenml.steps.step_context import get_or_create_run_context

from core.logs import quiet_libraries
from core.serving.completion_log import open_request_log
from core.serving.model import ServeConfig, ServedModel, ServeRequestError, load_served_model, validate_request

logger = logging.getLogger(__name__)


# Returns a ServedModel. Annotated Any: ZenML builds a pydantic schema of the hook's signature, and the
# model inside (torch modules, a lock) has none.
def load_server_state(config: ServeConfig | None = None) -> Any:
    """on_init hook: load the configured model version once; every request of this server shares it."""
    quiet_libraries()
    # ZenML validates the hook kwargs at deploy time, stores them as JSON, and passes them back as a dict.
    cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config or {})
    served = load_served_model(cfg)
    served.request_log = open_request_log(cfg)
    logger.info("serving %s", served.info)
    return served


def stop_server_state() -> None:
    """on_cleanup hook: stop the engine (engine llama_cpp: its llama-server child) and write what the request log
    holds, when the server shuts down."""
    try:
        served = get_or_create_run_context().state
    except RuntimeError:
        return
    if isinstance(served, ServedModel) and served._engine is not None:
        logger.info("stopping the %s engine", served.config.engine)
        served._engine.stop()
    if isinstance(served, ServedModel) and served.request_log is not None:
        served.request_log.close()


class ChatDeploymentService(PipelineDeploymentService):
    """ZenML's deployment service, plus request checks against the loaded model before a run is made.

    A bad request gets its own message in `error` (ZenML would otherwise report only "failure in step(s): chat")
    and costs no pipeline run. An error while generating still fails that run; its id is in the response.
    """

    def execute_pipeline(self, request):
        """`POST /invoke`: a bad request is answered with `success: false` and the reason in `error`."""
        params = request.parameters.model_dump()
        try:
            self._check(params)
        except ServeRequestError as err:
            return self._build_response(resolved_params=params, start_time=time.time(), error=err)
        return super().execute_pipeline(request)

    def prepare_pipeline_run(self, request):
        """Also `POST /submit`, which skips execute_pipeline: a bad request is HTTP 400 with the reason, no run."""
        from fastapi import HTTPException

        try:
            self._check(request.parameters.model_dump())
        except ServeRequestError as err:
            raise HTTPException(status_code=400, detail=str(err)) from None
        return super().prepare_pipeline_run(request)

    @staticmethod
    def _check(params: dict) -> None:
        served = get_or_create_run_context().state
        if isinstance(served, ServedModel):
            try:
                validate_request(served, **params)
            except ServeRequestError as err:
                logger.info("bad request: %s", err)
                raise
