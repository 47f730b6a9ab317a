"""The serving step, chat: one chat turn against the model the deployment loaded once (core/serving/model.py).

Runs inside pipelines/serve_pipeline.py for every `POST /invoke`. The model, tokenizer and adapters are the
pipeline state built by the `on_init` hook (`get_step_context().pipeline_state`), so a request only switches
adapter and generates. The deployment's service checks each request before it starts a run (see
pipelines/serve_pipeline.py); the step checks again (core.serving.model.answer), so a bad request that
reaches it by another way (e.g. /submit) fails that run with a ServeRequestError naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated

from zenml import get_step_context, step
from zenml.logger import get_logger

from core.artifact_names import ADAPTER_NAME, ANSWER, COMPLETION_TOKENS, PROMPT_TOKENS
from core.runs.caching import step_cache_policy
from core.serving.completion_log import record_invoke
from core.serving.model import ServedModel, ServeLoadError, answer

logger = get_logger(__name__)


def served_model_from_context() -> ServedModel:
    state = get_step_context().pipeline_state
    if not isinstance(state, ServedModel):
        raise ServeLoadError(
            "no served model in the pipeline state: serve_pipeline's on_init hook (load_server_state) did not run "
            f"or returned {type(state).__name__}"
        )
    return state


# Never cached: a cached answer would skip sampling and ignore which model the server loaded.
@step(enable_cache=False, cache_policy=step_cache_policy(__name__))
def chat(
    prompt: str, adapter: str = "", max_new_tokens: int = 128, temperature: float = 0.0
) -> tuple[
    Annotated[str, ANSWER],
    Annotated[str, ADAPTER_NAME],  # not "adapter": that name is the training artifact
    Annotated[int, PROMPT_TOKENS],
    Annotated[int, COMPLETION_TOKENS],
]:
    served = served_model_from_context()
    started = time.perf_counter()
    out = answer(served, prompt, adapter, max_new_tokens, temperature)
    # the request log's id for /invoke: the run id its client receives as metadata.run_id
    record_invoke(served, get_step_context().pipeline_run.id, prompt, out, max_new_tokens, temperature, started)
    logger.info(
        "adapter %s: %d prompt + %d completion tokens", out["adapter"], out["prompt_tokens"], out["completion_tokens"]
    )
    return out["answer"], out["adapter"], out["prompt_tokens"], out["completion_tokens"]
