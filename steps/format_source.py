"""Step 3d, format a mixed-in source (data.mix, train.replay): every row rendered and tokenized like the task's own
rows, all of them for training (core/data/formatting.py)."""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifact_names import SOURCE_DATASET
from core.config import PromptConfig
from core.data.formatting import format_source as format_rows
from core.data.formatting import token_stats
from core.models import BaseModelRef
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def format_source(
    clean_dataset: Dataset, base: BaseModelRef, prompt: PromptConfig, name: str
) -> Annotated[Dataset, SOURCE_DATASET]:
    rows = format_rows(clean_dataset, models.load_tokenizer(base), prompt, name)
    stats = token_stats(rows) | {"source": name, "dropped_overlong": len(clean_dataset) - len(rows)}
    logger.info("mix source %s: %s", name, stats)
    log_metadata(metadata=stats, artifact_name=SOURCE_DATASET, infer_artifact=True)
    return rows
