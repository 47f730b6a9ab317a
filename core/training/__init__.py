"""Training: QLoRA with bitsandbytes, peft and trl (trainer), its loss, checkpoints, what it needs from the machine
(disk, oom, packing, cpu_share, compute) and multi-GPU launch."""

from core import lazy_submodule
from core.training.trainer import train_adapter

__all__ = ["train_adapter"]


def __getattr__(name: str):  # `core.training.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
