"""Step 3e, mix data: the task's training rows plus each mixed-in source's share, drawn with a seed
(core/data/mixing.py). A source holding a prompt of the held-out split or the probe is refused, naming the rows."""

from __future__ import annotations

from typing import Annotated, Any

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import MIXED_TRAIN_DATASET
from core.data.formatting import token_stats
from core.data.mixing import Share, check_disjoint, mix
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def mix_data(
    train_dataset: Dataset,
    eval_dataset: Dataset,
    sources: list[Dataset],
    shares: list[dict[str, Any]],
    seed: int,
    general_dataset: Dataset | None = None,
) -> Annotated[Dataset, MIXED_TRAIN_DATASET]:
    """`shares[i]` is {name, ratio} or {name, rows} for `sources[i]`; `seed` draws the rows."""
    protected = {"held-out split": eval_dataset} | ({"probe": general_dataset} if general_dataset is not None else {})
    for share, rows in zip(shares, sources):
        check_disjoint(share["name"], rows, protected)
    mixed, record = mix(
        train_dataset,
        [Share(s["name"], rows, ratio=s.get("ratio"), count=s.get("rows")) for s, rows in zip(shares, sources)],
        seed,
    )
    logger.info(
        "mixed %d training rows: %d task + %s (seed %d)",
        record["rows"],
        record["task_rows"],
        ", ".join(f"{v['rows']} {k}" for k, v in record["sources"].items()),
        seed,
    )
    log_metadata(metadata=record | token_stats(mixed), artifact_name=MIXED_TRAIN_DATASET, infer_artifact=True)
    return mixed
