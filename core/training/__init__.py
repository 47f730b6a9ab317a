"""Training: QLoRA with bitsandbytes, peft and trl (trainer), its loss, checkpoints, resources and multi-GPU launch."""

from core.training.trainer import train_adapter

__all__ = ["train_adapter"]
