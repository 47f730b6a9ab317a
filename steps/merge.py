"""Step 6, merge: the adapter folded into a float16 (or bfloat16) copy of the base.

The base is reloaded in the merge dtype, never the 4-bit training model
(merging into quantized weights would bake the quantization error into the
shipped model). Before saving, merged logits are compared with base+adapter
(unmerged, same dtype) on a few eval batches; a mismatch above
`merge.logit_rtol` fails the step. The output is sharded safetensors with the
tokenizer and generation config.

The step first enforces the quality gate from evaluate: a failed candidate
stops here, before anything is merged or pushed (unless gate.on_fail is warn).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import torch
from datasets import Dataset
from zenml import log_metadata, step
from zenml.config.cache_policy import CachePolicy
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifacts import ModelFolder, scratch_dir
from core.config import MergeConfig, ModelSource
from core.reports import EvalReport
from steps import evaluate as evaluate_module
from steps.evaluate import _pad

logger = get_logger(__name__)


class QualityGateError(RuntimeError):
    pass


class MergeMismatchError(RuntimeError):
    pass


def enforce_gate(report: EvalReport) -> None:
    if report.gate_passed:
        return
    reasons = "\n  ".join(m for m in report.gate_messages if m.endswith("FAIL"))
    if report.on_fail == "warn":
        logger.warning("quality gate failed (evaluate.gate.on_fail=warn, continuing):\n  %s", reasons)
        return
    raise QualityGateError(
        f"quality gate failed against {report.reference_name}; not merging or pushing this candidate:\n  {reasons}"
    )


@torch.no_grad()
def _logits(model, batches: list[list[list[int]]], pad_id: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for seqs in batches:
        ids = _pad(seqs, pad_id, left=False).to(device)
        mask = _pad([[1] * len(s) for s in seqs], 0, left=False).to(device)
        out.append(model(input_ids=ids, attention_mask=mask).logits.float().cpu() * mask.cpu()[..., None])
    return out


def merge_adapter(
    adapter: ModelFolder, model: ModelSource, cfg: MergeConfig, check_ds: Dataset, out_dir: Path, batch_size: int = 4
) -> tuple[ModelFolder, dict]:
    """Merge, verify logits, save. Returns the folder and what was recorded about it."""
    from peft import PeftModel

    dtype = getattr(torch, cfg.dtype)
    tokenizer = models.load_tokenizer(model)
    base = models.load_base(model, quant=None, dtype=dtype)
    peft_model = PeftModel.from_pretrained(base, str(adapter.path)).eval()

    rows = list(check_ds.select(range(min(len(check_ds), cfg.check_batches * batch_size)))["input_ids"])
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    expected = _logits(peft_model, batches, tokenizer.pad_token_id)
    merged = peft_model.merge_and_unload()
    actual = _logits(merged, batches, tokenizer.pad_token_id)
    rel = max(float((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) for a, e in zip(actual, expected))
    if rel > cfg.logit_rtol:
        raise MergeMismatchError(
            f"merged logits differ from base+adapter by {rel:.2e} of the logit range "
            f"(merge.logit_rtol={cfg.logit_rtol}); not saving the merged model"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=cfg.max_shard_size)
    tokenizer.save_pretrained(out_dir)
    folder = ModelFolder(out_dir)
    info = {
        "dtype": cfg.dtype,
        "size_bytes": folder.size_bytes(),
        "shards": len(list(out_dir.glob("*.safetensors"))),
        "logit_max_rel_diff": rel,
        "checked_rows": len(rows),
    }
    return folder, info


# ZenML hashes only the step function itself: add this whole file and the helpers it calls.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], models, evaluate_module]))
def merge(
    adapter: ModelFolder,
    eval_report: EvalReport,
    eval_dataset: Dataset,
    model: ModelSource,
    merge: MergeConfig,
    base_id: str = "",
) -> Annotated[ModelFolder, "merged_model"]:
    from steps.train import quiet_libraries

    quiet_libraries()
    enforce_gate(eval_report)
    out = scratch_dir("merged-") / "model"
    folder, info = merge_adapter(adapter, model, merge, eval_dataset, out)
    logger.info("merged model: %s", info)
    log_metadata(metadata=info, artifact_name="merged_model", infer_artifact=True)
    return folder
