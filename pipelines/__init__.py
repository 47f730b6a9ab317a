"""`zenml pipeline run pipelines.lora_pipeline -c configs/default.yaml` resolves here."""

from pipelines.lora_pipeline import lora_pipeline

__all__ = ["lora_pipeline"]
