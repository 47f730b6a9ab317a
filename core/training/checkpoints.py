"""Checkpoints: one folder per (data, base, settings), so a rerun after a crash resumes where it stopped.

Checkpoints go to `train.checkpoint_dir/<key>`, where the key hashes the data, base model and every
training setting. Re-running the same training resumes from the newest *complete* checkpoint (adapter,
optimizer state and trainer_state.json all present); an incomplete one is skipped.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from datasets import Dataset

from core.artifacts import dataset_content_hash

logger = logging.getLogger(__name__)

COMPLETE_MARKERS = ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")


def checkpoint_key(train_ds: Dataset, eval_ds: Dataset, base_identity: str, *settings) -> str:
    """Same data + base + settings -> same folder, so a rerun finds its checkpoints."""
    h = hashlib.sha256()
    for part in (dataset_content_hash(train_ds), dataset_content_hash(eval_ds), base_identity):
        h.update(part.encode())
    for s in settings:
        h.update(s.model_dump_json(exclude={"checkpoint_dir", "logging_steps", "cpu_threads"}).encode())
    return h.hexdigest()[:16]


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint-N with adapter, optimizer state and trainer state; incomplete ones are skipped."""
    found = []
    for ckpt in run_dir.glob("checkpoint-*"):
        try:
            step_no = int(ckpt.name.split("-")[-1])
        except ValueError:
            continue
        missing = [m for m in COMPLETE_MARKERS if not (ckpt / m).exists()]
        if missing:
            logger.warning("skipping incomplete checkpoint %s (missing %s)", ckpt, ", ".join(missing))
            continue
        found.append((step_no, ckpt))
    return max(found)[1] if found else None
