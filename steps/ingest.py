"""Step 1, ingest: read the configured data into one canonical, versioned dataset (core/data/ingest.py)."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401  (registers the dataset materializer)
from core.artifact_names import RAW_DATASET
from core.config import DataSource
from core.data import feedback
from core.data.ingest import load_rows
from core.runs import registry
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def ingest(data: DataSource, fingerprint: str) -> Annotated[Dataset, RAW_DATASET]:
    """Read and map the configured data; `fingerprint` (core.data.ingest.source_fingerprint) only keys the cache:
    ZenML's cache key sees parameters, not the files they point at."""
    if data.source == "feedback":  # the store and window this run reads, in the logs and metadata below
        data = feedback.resolved(data)
    ds = load_rows(data)
    counts = {s or "unassigned": n for s, n in pd.Series(ds["split"]).value_counts().items()}
    logger.info("ingested %d rows from %s (%s)", len(ds), data.where, counts)
    metadata = {"rows": len(ds), "splits": counts, "source": f"{data.source}:{data.where}", "fingerprint": fingerprint}
    if data.source == "feedback":  # which completions this version learns from (cli.trace, the model history)
        record = feedback.ingest_record(data, ds)
        metadata["feedback"] = record
        registry.record({feedback.record_key(data): record})
    log_metadata(metadata=metadata, artifact_name=RAW_DATASET, infer_artifact=True)
    return ds
