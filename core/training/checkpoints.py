"""Checkpoints: one folder per (data, base, settings), so a rerun after a crash resumes where it stopped.

Checkpoints go to `train.checkpoint_dir/<key>`, where the key hashes the data, base model and every
training setting. Re-running the same training resumes from the newest *complete* checkpoint (adapter,
optimizer state and trainer_state.json all present); an incomplete one is skipped.

Two identical trainings started together (a schedule overlapping a manual run, two pods on one volume) share
that folder: `checkpoint_lock` lets one train at a time; the other waits, then resumes from what the first
left, so it trains only the steps still missing (none, when the first finished).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from datasets import Dataset

from core.artifacts import dataset_content_hash

logger = logging.getLogger(__name__)

COMPLETE_MARKERS = ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")


# Settings that change nothing trained (where checkpoints go, how often the loss is logged, CPU threads), and the
# preference stage's data source and start, whose effect is keyed by content: the rows' hash, the start adapter's.
UNKEYED = {"checkpoint_dir": True, "logging_steps": True, "cpu_threads": True, "preference": {"data", "start_from"}}


def checkpoint_key(train_ds: Dataset, eval_ds: Dataset, base_identity: str, *settings, start: str | None = None) -> str:
    """Same data + base + settings (+ start adapter) -> same folder, so a rerun finds its checkpoints."""
    h = hashlib.sha256()
    for part in (dataset_content_hash(train_ds), dataset_content_hash(eval_ds), base_identity):
        h.update(part.encode())
    for s in settings:
        h.update(s.model_dump_json(exclude=UNKEYED).encode())
    if start is not None:  # only then: a run from a new adapter keeps the key it always had
        h.update(f"start:{start}".encode())
    return h.hexdigest()[:16]


def adapter_identity(folder: Path) -> str:
    """sha256 of an adapter folder's config and weights: changes whenever the adapter would."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("adapter_*"))
    if not any(f.name.startswith("adapter_model") for f in files):
        raise FileNotFoundError(f"{folder} holds no adapter (adapter_config.json + adapter_model.safetensors)")
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def checkpoint_folder(
    train_ds: Dataset, eval_ds: Dataset, base, quant, lora, cfg, start_adapter: Path | None = None
) -> Path:
    """train.checkpoint_dir/<checkpoint_key>: where this training's checkpoints go (base: a BaseModelRef;
    start_adapter: the adapter a preference stage continues, keyed by its contents)."""
    start = adapter_identity(start_adapter) if start_adapter is not None else None
    return Path(cfg.checkpoint_dir) / checkpoint_key(train_ds, eval_ds, base.identity, quant, lora, cfg, start=start)


def checkpoint_step(checkpoint: Path | str) -> int:
    """The training step a checkpoint-N folder was saved at: N."""
    return int(Path(checkpoint).name.split("-")[-1])


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


LOCK_FILE = ".lock"


def in_process_group() -> bool:
    """True inside one rank of a multi-process training (accelerate sets WORLD_SIZE): the launching process holds
    the folder's lock for every rank, which must not take it again (they would wait on each other forever)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def checkpoint_lock(run_dir: Path) -> Iterator[None]:
    """Hold the checkpoint folder for one training: an exclusive flock on run_dir/.lock, released when the block
    ends or the process dies (the kernel drops it: a killed container never leaves a stale lock). Works across
    processes and containers on one host, and on shared volumes whose filesystem supports flock (local disks,
    NFSv4); the holder's pid, host and start time are written into the file for whoever waits."""
    path = Path(run_dir) / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another run"
            logger.warning(
                "checkpoint folder %s is in use (%s): waiting for that training to end, then resuming from its "
                "checkpoints",
                run_dir,
                holder,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
