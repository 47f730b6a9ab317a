"""The checkpoint disk must hold the checkpoints and the merged model, or the run fails in seconds, before anything
loads (check_disk_space, from the model's config alone: count_parameters)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from core import models
from core.config import LoraSettings, ModelSource


class InsufficientDiskError(OSError):
    """Less free disk than the run's checkpoints and merged model need; raised before any training."""


def count_parameters(model: ModelSource, lora: LoraSettings) -> tuple[int, int]:
    """(base model parameters, LoRA parameters), from the model's config alone: built on the meta device, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.resolve_model(model), revision=model.revision)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in base.parameters())  # tied embeddings count once
    output = base.get_output_embeddings()  # "all-linear" leaves the LM head out, as peft does
    adapter = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if lora.target_modules != "all-linear" and name.split(".")[-1] not in lora.target_modules:
            continue
        # A (r x in) + B (out x r); DoRA adds one magnitude per output feature
        adapter += lora.r * (module.in_features + module.out_features) + (module.out_features if lora.use_dora else 0)
    return total, adapter


def disk_needed(base_params: int, lora_params: int, save_total_limit: int) -> dict[str, int]:
    """Bytes of disk this run writes, by part; "total" is their sum.

    Per checkpoint: the adapter in fp32 (4 bytes/param) and AdamW's two fp32 moments (8 bytes/param; 8-bit paged
    AdamW needs about a quarter of that, so this errs high). The trainer writes a new checkpoint before deleting the
    oldest, so save_total_limit + 1 exist at the peak. The merge step then writes the base in fp16/bf16 (2 bytes/param).
    """
    per_checkpoint = lora_params * (4 + 8)
    parts = {
        "checkpoints": per_checkpoint * (save_total_limit + 1),
        "per_checkpoint": per_checkpoint,
        "merged_model": base_params * 2,
    }
    parts["total"] = parts["checkpoints"] + parts["merged_model"]
    return parts


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_disk_space(path: Path, base_params: int, lora_params: int, save_total_limit: int) -> dict[str, int]:
    """Raise InsufficientDiskError when the disk holding `path` has less free space than disk_needed(...)."""
    need = disk_needed(base_params, lora_params, save_total_limit)
    free = shutil.disk_usage(path).free
    if free < need["total"]:
        raise InsufficientDiskError(
            f"not enough free disk for training: {path} has {_size(free)} free, this run needs about "
            f"{_size(need['total'])} ({save_total_limit + 1} checkpoints x {_size(need['per_checkpoint'])} adapter + "
            f"optimizer state, and {_size(need['merged_model'])} for the merged 16-bit model of "
            f"{base_params / 1e9:.2f}B parameters). Free some space, point train.checkpoint_dir at a larger disk, "
            "or lower train.save_total_limit."
        )
    return need
