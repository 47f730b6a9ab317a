"""Step 3e, format preference: the preference stage's rows (train.preference.data) rendered with the run's template
and system prompt in trl's standard format, and the held-out split (core/data/preference.py)."""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifact_names import PREFERENCE_EVAL, PREFERENCE_TRAIN
from core.config import PromptConfig
from core.data.preference import format_preference as format_rows
from core.models import BaseModelRef
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def format_preference(
    clean_dataset: Dataset, base: BaseModelRef, prompt: PromptConfig, max_length: int, method: str
) -> tuple[Annotated[Dataset, PREFERENCE_TRAIN], Annotated[Dataset, PREFERENCE_EVAL]]:
    """`base` keys the cache to the tokenizer's files, `prompt` to the template and system prompt the SFT rows use;
    `max_length` and `method` (dpo, kto, orpo) are train.preference's, passed alone so that changing beta or the
    schedule does not re-format the rows."""
    train, held_out, stats = format_rows(clean_dataset, models.load_tokenizer(base), prompt, max_length, method)
    shared = {k: v for k, v in stats.items() if k not in ("train", "eval")}
    for name, split in ((PREFERENCE_TRAIN, "train"), (PREFERENCE_EVAL, "eval")):
        metadata = stats[split] | shared
        logger.info("%s: %s", name, metadata)
        log_metadata(metadata=metadata, artifact_name=name, infer_artifact=True)
    return train, held_out
