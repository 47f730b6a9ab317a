"""Step 3c, synthesize rehearsal: the base model answers the replay prompts itself (train.replay.answers: own), and
its answers become the replay rows (core/data/rehearsal.py). Cached: the answers are written once per base model,
prompt set and generation settings, and versioned with who wrote them."""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import REHEARSAL_DATASET
from core.config import PromptConfig
from core.data.rehearsal import synthesize
from core.logs import quiet_libraries
from core.models import BaseModelRef
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def synthesize_rehearsal(
    prompts_dataset: Dataset, base: BaseModelRef, prompt: PromptConfig, max_new_tokens: int, batch_size: int
) -> Annotated[Dataset, REHEARSAL_DATASET]:
    """`base` keys the cache to the model that writes the answers; `prompt` to the template and system prompt it
    answers under; `max_new_tokens` to the longest answer (batch_size: prompts per generate call). The share and
    the KL weight are not parameters: changing them re-mixes, it does not rewrite the answers."""
    quiet_libraries()
    rows, stats = synthesize(prompts_dataset, base, prompt, max_new_tokens, batch_size)
    log_metadata(metadata=stats, artifact_name=REHEARSAL_DATASET, infer_artifact=True)
    return rows
