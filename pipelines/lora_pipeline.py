"""lora_pipeline: ingest -> validate -> format prompts -> QLoRA train -> evaluate vs base -> FP16 merge -> push
-> promote.

    zenml pipeline run pipelines.lora_pipeline -c configs/default.yaml     # one adapter (pipelines/single_run.py)
    zenml pipeline run pipelines.lora_pipeline -c configs/multitask.yaml   # one adapter per task (pipelines/multitask.py)
    zenml pipeline run pipelines.lora_pipeline -c configs/sweep.yaml       # a grid; the best point ships (pipelines/sweep.py)

Every artifact is versioned in the active ZenML stack and linked to the ZenML Model named in the run config
(`model:`), so each run makes one model version. The config picks the shape of the DAG when the run is
compiled; each shape is wired in its own module.
"""

from __future__ import annotations

from zenml import Model, pipeline

from core.config import PipelineConfig
from core.logs import install_error_hook
from core.models import resolve_base
from core.runs.preflight import check_artifact_store
from pipelines.multitask import multitask_run
from pipelines.single_run import single_run
from pipelines.sweep import sweep_run

install_error_hook()  # a run stopped by our own error ends with its message (zenml pipeline run imports this)


@pipeline(enable_cache=True, model=Model(name="qlora-adapter", license="apache-2.0"))
def lora_pipeline(config: PipelineConfig) -> None:
    # Before anything is uploaded or any step container starts: a remote artifact store that cannot be reached or
    # refuses its credentials stops the run here with one line naming the store (core/runs/preflight.py).
    check_artifact_store()
    # Runs on the client while ZenML compiles the DAG: the base model is resolved once into a typed reference
    # whose identity (GGUF file, local folder contents, Hub revision) keys every step that loads it.
    base = resolve_base(config.model)
    if config.tasks:
        multitask_run(config, base)
    elif config.sweep:
        sweep_run(config, base)
    else:
        single_run(config, base)
