"""serve_pipeline: chat with a trained model version over HTTP, as a ZenML deployment.

    zenml pipeline deploy --name lora-chat pipelines.serve_pipeline -c configs/serve.yaml --stack local-serve
    curl -s -X POST http://127.0.0.1:8000/invoke -H 'Content-Type: application/json' \\
        -d '{"parameters": {"prompt": "Can I return worn boots?", "adapter": "default"}}'
    zenml deployment deprovision lora-chat

(`make serve` / `make unserve` register the local deployer and stack first; see README "Serving".)

The `on_init` hook runs once per server: it finds the ZenML Model version named in the config
(`on_init_kwargs.config`, a core.serving.ServeConfig) and loads either the base with every adapter
of that version, each under its own name, or the merged model. Each invocation runs one `chat`
step that reads that state, switches adapter (no reload) and generates. The pipeline parameters
are the request fields: prompt, adapter, max_new_tokens, temperature; the step outputs are the
response's `outputs`: answer, adapter_name, prompt_tokens, completion_tokens.

Bad requests: a wrong type or an unknown field is refused by ZenML's request model (HTTP 422).
Everything else (empty prompt, unknown adapter, out-of-range values, a prompt over the context
length) is checked by core.deployment.ChatDeploymentService against the loaded model before any pipeline run is
created, and answered with `success: false` and the reason in `error`. The server keeps serving.
"""

from __future__ import annotations

from zenml import pipeline
from zenml.config import DeploymentSettings

from core.deployment import ChatDeploymentService, load_server_state
from steps.chat import chat


@pipeline(
    enable_cache=False,  # every request generates; a cached answer would ignore the loaded model and sampling
    on_init=load_server_state,
    settings={
        "deployment": DeploymentSettings(
            app_title="lora-chat",
            app_description="Chat with a QLoRA-tuned model version; pick an adapter per request.",
            deployment_service_class=ChatDeploymentService,
        )
    },
)
def serve_pipeline(prompt: str = "", adapter: str = "", max_new_tokens: int = 128, temperature: float = 0.0):
    answer, adapter_name, prompt_tokens, completion_tokens = chat(
        prompt=prompt, adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature
    )
    return answer, adapter_name, prompt_tokens, completion_tokens
