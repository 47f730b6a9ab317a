"""What the request log records for each completion served: the row built from a finished chat job or /invoke
answer, handed to the deployment's RequestLog (core/feedback/requestlog.py), which redacts and writes it.

Called by core/serving/openai/service.py (POST /v1/chat/completions, whole or when a stream finishes) and
steps/chat.py (POST /invoke, keyed by its pipeline run id, the `metadata.run_id` its client receives).
"""

from __future__ import annotations

import time
from typing import Any

from core.feedback.store import utcnow


def open_request_log(cfg) -> Any:
    """The RequestLog a deployment records to (a core.serving.model.ServeConfig), or None with log_requests off."""
    if not cfg.log_requests:
        return None
    from core.feedback.requestlog import RequestLog, default_url

    return RequestLog(cfg.request_log.url or default_url(cfg.model_name), cfg.request_log)


def row(
    served,
    *,
    id: str,
    endpoint: str,
    adapter: str,
    messages: list[dict],
    answer: str,
    sampling: dict,
    prompt_tokens: int,
    completion_tokens: int,
    started: float,
    stream: bool = False,
) -> dict[str, Any]:
    """A Completion row (core/feedback/store.py) for a completion `served` answered; `started`: perf_counter."""
    return dict(
        id=id,
        created_at=utcnow(),
        endpoint=endpoint,
        model=str(served.info.get("model_name", served.config.model_name)),
        version=str(served.info.get("model_version", "")),
        adapter=adapter,
        messages=messages,
        answer=answer,
        sampling=sampling,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_s=round(time.perf_counter() - started, 4),
        stream=stream,
    )


def record(served, completion: dict[str, Any]) -> None:
    """Hand the row to the deployment's request log; nothing when the log is off. Never blocks, never raises."""
    log = getattr(served, "request_log", None)
    if log is not None:
        log.record(completion)


def record_chat(served, job, stream: bool) -> None:
    """A finished chat completion job (core/serving/openai/service.py's ChatJob)."""
    gen = job.generation
    sampling = dict(
        temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_new_tokens, stop=gen.stop, seed=gen.seed
    )
    record(
        served,
        row(
            served,
            id=job.id,
            endpoint="chat.completions",
            adapter=job.request.model,
            messages=job.request.conversation(),
            answer=gen.text,
            sampling=sampling,
            prompt_tokens=len(gen.input_ids),
            completion_tokens=gen.generated,
            started=job.started,
            stream=stream,
        ),
    )


def record_invoke(served, run_id: str, prompt: str, out: dict, max_new_tokens: int, temperature: float, started):
    """A POST /invoke answer (core.serving.model.answer's dict), keyed by its pipeline run id."""
    record(
        served,
        row(
            served,
            id=str(run_id),
            endpoint="invoke",
            adapter=out["adapter"],
            messages=[{"role": "user", "content": prompt}],
            answer=out["answer"],
            sampling=dict(temperature=temperature, max_tokens=max_new_tokens),
            prompt_tokens=out["prompt_tokens"],
            completion_tokens=out["completion_tokens"],
            started=started,
        ),
    )
