"""Optional step, export_gguf: the merged model as one f16 GGUF file for llama.cpp and Ollama, verified by
loading it back, plus an Ollama Modelfile (core/gguf.py). Runs after merge when `export.enabled` is true.

    ollama create my-model -f Modelfile && ollama run my-model
    llama-cli -m <name>-F16.gguf -cnv
"""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models, registry
from core.artifacts import ModelFolder, scratch_dir
from core.caching import step_cache_policy
from core.config import ExportConfig
from core.gguf import default_name, export_model
from core.logs import quiet_libraries
from core.models import BaseModelRef

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def export_gguf(
    merged: ModelFolder,
    eval_dataset: Dataset,
    base: BaseModelRef,
    export: ExportConfig,
    system_prompt: str | None = None,
) -> Annotated[ModelFolder, "gguf_model"]:
    quiet_libraries()
    name = export.name or registry.current_model_name() or default_name(base)
    rows = list(eval_dataset.select(range(min(len(eval_dataset), export.check_rows)))["input_ids"])
    folder, info = export_model(
        merged,
        rows,
        export,
        scratch_dir("gguf-") / "gguf",
        name,
        base_model=models.display_name(base),
        system_prompt=system_prompt,
    )
    logger.info("GGUF export: %s", info)
    log_metadata(metadata=info, artifact_name="gguf_model", infer_artifact=True)
    return folder
