"""`zenml pipeline run pipelines.lora_pipeline -c configs/default.yaml` resolves here."""

from pipelines.lora_pipeline import lora_pipeline
from pipelines.serve_pipeline import serve_pipeline  # `zenml pipeline deploy ... pipelines.serve_pipeline`

__all__ = ["lora_pipeline", "serve_pipeline"]
