"""Optional step, export_gguf: the merged model as GGUF files for llama.cpp and Ollama (f16, Q8_0, Q4_K_M by
`export.types`), each loaded back and checked against the merged model, plus an Ollama Modelfile whose template
is checked against training's (core/export/gguf.py, core/export/llamacpp.py). Runs after merge when `export.enabled` is true.

    ollama create my-model -f Modelfile && ollama run my-model
    llama-cli -m <name>-Q4_K_M.gguf -cnv
"""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifact_names import GGUF_MODEL
from core.artifacts import ModelFolder, scratch_dir
from core.config import ExportConfig
from core.export.gguf import default_name, export_model
from core.logs import quiet_libraries
from core.models import BaseModelRef
from core.runs import registry
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def export_gguf(
    merged: ModelFolder,
    eval_dataset: Dataset,
    base: BaseModelRef,
    export: ExportConfig,
    system_prompt: str | None = None,
) -> Annotated[ModelFolder, GGUF_MODEL]:
    quiet_libraries()
    name = export.name or registry.current_model_name() or default_name(base)
    head = eval_dataset.select(range(min(len(eval_dataset), max(export.check_rows, export.perplexity_rows))))
    rows = list(head["input_ids"])  # prompt + answer: logits / perplexity
    prompts = [ids[:n] for ids, n in zip(head["input_ids"], head["prompt_len"])]  # greedy answers
    folder, info = export_model(
        merged,
        rows,
        export,
        scratch_dir("gguf-") / "gguf",
        name,
        base_model=models.display_name(base),
        system_prompt=system_prompt,
        prompts=prompts,
    )
    logger.info("GGUF export: %s", info)
    log_metadata(metadata=info, artifact_name=GGUF_MODEL, infer_artifact=True)
    return folder
