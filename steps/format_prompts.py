"""Step 3, format prompts: chat template -> token ids -> response-only labels, and the train/eval split
(core/data/formatting.py)."""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifact_names import EVAL_DATASET, TRAIN_DATASET
from core.config import PromptConfig
from core.data.formatting import format_dataset, token_stats
from core.models import BaseModelRef
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def format_prompts(
    clean_dataset: Dataset, base: BaseModelRef, prompt: PromptConfig
) -> tuple[Annotated[Dataset, TRAIN_DATASET], Annotated[Dataset, EVAL_DATASET]]:
    """`base` carries the base model's identity, which keys the cache to the exact tokenizer files."""
    tokenizer = models.load_tokenizer(base)
    train, held_out, counts = format_dataset(clean_dataset, tokenizer, prompt)
    for name, ds in ((TRAIN_DATASET, train), (EVAL_DATASET, held_out)):
        stats = token_stats(ds) | counts
        logger.info("%s: %s", name, stats)
        log_metadata(metadata=stats, artifact_name=name, infer_artifact=True)
    return train, held_out
