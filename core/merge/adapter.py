"""Merge: the adapter folded into a float16 (or bfloat16) copy of the base.

    python benchmarks/merge.py --preset cpu     # streamed merge vs peft's merge_and_unload

The base is never the 4-bit training model (merging into quantized weights
would bake the quantization error into the shipped model). By default
(`merge.method: auto`) the merge is streamed (core/merge/stream.py): the
base's safetensors shards are read a chunk of one tensor at a time, each
weight the adapter targets gets scale * (B @ A) in fp32 (on the GPU when there
is one), and the result is written straight into fp16/bf16 output shards, so
host memory holds a chunk, not the model. Adapters whose merge peft computes
differently (DoRA, modules_to_save, ...) fall back to loading the base in the
merge dtype and peft's `merge_and_unload`, with the reason logged and recorded.

Before the result is moved into place, merged logits are compared with
base+adapter (unmerged, same dtype) on a few eval batches; a mismatch above
`merge.logit_rtol` fails the step. The output is sharded safetensors with the
tokenizer and generation config, written to a temporary folder first: a
failure leaves no half-written model behind.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset

from core import models
from core.artifacts import ModelFolder
from core.config import MergeConfig, ModelSource
from core.merge import stream as merge_stream
from core.tensors import batch_logits, max_relative_diff

logger = logging.getLogger(__name__)


class MergeMismatchError(RuntimeError):
    """The merged model's logits differ from base+adapter by more than merge.logit_rtol; nothing was saved."""


def base_folder(model: ModelSource) -> Path:
    """The base model as a local folder: bundled and local as they are, a Hub model as its cached snapshot."""
    path = models.resolve_model(model)
    if model.source == "hub":
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
        path = snapshot_download(model.name, revision=model.revision, allow_patterns=patterns)
    return Path(path)


def _release() -> None:
    """Return a dropped model's memory now, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _adapter_logits(model: ModelSource, adapter: ModelFolder, dtype, batches, pad_id) -> list[torch.Tensor]:
    """Logits of base+adapter (unmerged, in the merge dtype): what the merged model must reproduce."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(models.load_base(model, quant=None, dtype=dtype), str(adapter.path)).eval()
    out = batch_logits(peft_model, batches, pad_id)
    del peft_model
    _release()
    return out


def _choose_method(adapter: ModelFolder, model: ModelSource, cfg: MergeConfig):
    """('streamed', plan, None) or ('peft', None, reason)."""
    if cfg.method == "peft":
        return "peft", None, "merge.method is 'peft'"
    try:
        plan = merge_stream.plan_merge(base_folder(model), adapter.path, cfg.dtype)
    except merge_stream.NotStreamable as err:
        if cfg.method == "streamed":
            raise merge_stream.NotStreamable(
                [f"merge.method is 'streamed' but this adapter cannot be streamed: {err}"]
            ) from None
        logger.warning("merge: peft merge_and_unload instead of the streamed merge, because: %s", err)
        return "peft", None, str(err)
    return "streamed", plan, None


def merge_adapter(
    adapter: ModelFolder, model: ModelSource, cfg: MergeConfig, check_ds: Dataset, out_dir: Path, batch_size: int = 4
) -> tuple[ModelFolder, dict]:
    """Merge, verify logits, move into `out_dir`. Returns the folder and what was recorded about it."""
    dtype = getattr(torch, cfg.dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"merge output folder {out_dir} already exists and is not empty")
    tokenizer = models.load_tokenizer(model)
    rows, batches = _check_batches(check_ds, cfg.check_batches, batch_size)
    pad_id = tokenizer.pad_token_id

    start = time.perf_counter()
    method, plan, reason = _choose_method(adapter, model, cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written under a temporary sibling and renamed into place only once checked.
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    staged = work / "model"
    try:
        if method == "streamed":
            merge_seconds, expected, actual = _streamed_merge(plan, adapter, model, cfg, tokenizer, staged, batches)
        else:
            merged, merge_seconds, expected, actual = _peft_merge(adapter, model, dtype, batches, pad_id, start)
        rel = _check_logits(actual, expected, cfg.logit_rtol)
        if method == "peft":
            merged.save_pretrained(staged, safe_serialization=True, max_shard_size=cfg.max_shard_size)
            tokenizer.save_pretrained(staged)
        if out_dir.exists():
            out_dir.rmdir()  # the empty placeholder checked above
        os.replace(staged, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    folder = ModelFolder(out_dir)
    return folder, _merge_record(folder, cfg, method, reason, rel, len(rows), merge_seconds)


def _check_batches(check_ds: Dataset, check_batches: int, batch_size: int) -> tuple[list, list[list]]:
    """The first eval rows' input_ids, in batches: what the merged and unmerged logits are compared on."""
    rows = list(check_ds.select(range(min(len(check_ds), check_batches * batch_size)))["input_ids"])
    return rows, [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def _streamed_merge(plan, adapter: ModelFolder, model: ModelSource, cfg: MergeConfig, tokenizer, staged: Path, batches):
    """The streamed merge into `staged`: (seconds, base+adapter logits, merged logits), one model in memory at once."""
    dtype = getattr(torch, cfg.dtype)
    pad_id = tokenizer.pad_token_id
    stats = merge_stream.stream_merge(
        plan.base_dir,
        adapter.path,
        staged,
        cfg.dtype,
        cfg.max_shard_size,
        device=cfg.device,
        tokenizer=tokenizer,
        plan=plan,
    )
    # One model in memory at a time: base+adapter first, then the merged files as written.
    expected = _adapter_logits(model, adapter, dtype, batches, pad_id)
    merged = models.load_base(ModelSource(source="local", name=str(staged)), quant=None, dtype=dtype)
    actual = batch_logits(merged, batches, pad_id)
    del merged
    _release()
    return stats["seconds"], expected, actual


def _peft_merge(adapter: ModelFolder, model: ModelSource, dtype, batches, pad_id, start: float):
    """peft's merge_and_unload on the base in the merge dtype; (merged model, seconds since `start`, logits)."""
    from peft import PeftModel

    base = models.load_base(model, quant=None, dtype=dtype)
    peft_model = PeftModel.from_pretrained(base, str(adapter.path)).eval()
    expected = batch_logits(peft_model, batches, pad_id)
    merged = peft_model.merge_and_unload()
    merge_seconds = time.perf_counter() - start
    actual = batch_logits(merged, batches, pad_id)
    return merged, merge_seconds, expected, actual


def _check_logits(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float) -> float:
    """The merged logits' largest gap to base+adapter (of the logit range); MergeMismatchError above `rtol`."""
    rel = max_relative_diff(actual, expected)
    if rel > rtol:
        raise MergeMismatchError(
            f"merged logits differ from base+adapter by {rel:.2e} of the logit range "
            f"(merge.logit_rtol={rtol}); not saving the merged model"
        )
    return rel


def _merge_record(
    folder: ModelFolder, cfg: MergeConfig, method: str, reason: str | None, rel: float, rows: int, seconds: float
) -> dict:
    """What the merge step records on the merged model: size, method, the logit check, any fallback's reason."""
    info = {
        "dtype": cfg.dtype,
        "size_bytes": folder.size_bytes(),
        "shards": len(list(folder.path.glob("*.safetensors"))),
        "logit_max_rel_diff": rel,
        "checked_rows": rows,
        "method": method,
        "merge_seconds": round(seconds, 3),
    }
    if reason and cfg.method != "peft":
        info["fallback_reason"] = reason[:1000]
    return info
