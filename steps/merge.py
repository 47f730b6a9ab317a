"""Step 6, merge: the adapter folded into a float16 (or bfloat16) copy of the base, checked by its logits
(core/merge/adapter.py, core/merge/stream.py).

    python benchmarks/merge.py --preset cpu     # streamed merge vs peft's merge_and_unload

The step first enforces the quality gate from evaluate (core/evaluation/gate.py): a failed candidate stops here,
before anything is merged or pushed (unless gate.on_fail is warn).
"""

from __future__ import annotations

from typing import Annotated

from datasets import Dataset
from zenml import log_metadata, step
from zenml.logger import get_logger

import materializers  # noqa: F401
from core.artifact_names import MERGED_MODEL
from core.artifacts import ModelFolder, scratch_dir
from core.config import MergeConfig
from core.evaluation.gate import enforce_gate
from core.logs import quiet_libraries
from core.merge.adapter import merge_adapter
from core.models import BaseModelRef
from core.reports import EvalReport
from core.runs.caching import step_cache_policy

logger = get_logger(__name__)


@step(cache_policy=step_cache_policy(__name__))
def merge(
    adapter: ModelFolder, eval_report: EvalReport, eval_dataset: Dataset, base: BaseModelRef, merge_cfg: MergeConfig
) -> Annotated[ModelFolder, MERGED_MODEL]:
    quiet_libraries()
    enforce_gate(eval_report)
    folder, info = merge_adapter(adapter, base, merge_cfg, eval_dataset, scratch_dir("merged-") / "model")
    logger.info("merged model: %s", info)
    log_metadata(metadata=info, artifact_name=MERGED_MODEL, infer_artifact=True)
    return folder
