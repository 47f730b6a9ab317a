"""Step 3b, load probe: the general-ability probe set (evaluate.general), tokenized like the run's own rows, for
evaluate's forgetting check (core/data/ingest.py reads it, core/data/formatting.py formats it)."""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifact_names import GENERAL_DATASET
from core.config import DataSource, PromptConfig
from core.data.formatting import format_probe, token_stats
from core.data.ingest import load_rows
from core.models import BaseModelRef
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def load_probe(
    general: DataSource, fingerprint: str, base: BaseModelRef, prompt: PromptConfig
) -> Annotated[Dataset, GENERAL_DATASET]:
    """`fingerprint` (core.data.ingest.source_fingerprint) keys the cache to the probe file's bytes; `base` to the
    tokenizer's files; `prompt` to the template and system prompt the run's own rows use."""
    probe = format_probe(load_rows(general), models.load_tokenizer(base), prompt)
    stats = token_stats(probe) | {"source": f"{general.source}:{general.path}", "fingerprint": fingerprint}
    logger.info("general-ability probe: %s", stats)
    log_metadata(metadata=stats, artifact_name=GENERAL_DATASET, infer_artifact=True)
    return probe
