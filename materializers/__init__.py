"""ZenML materializers for this project's artifacts. Importing registers them."""

import datasets
import transformers

from materializers.dataset_materializer import HFDatasetMaterializer
from materializers.folder_materializer import FolderMaterializer
from materializers.report_materializer import ReportMaterializer

# Per-call progress bars (saving a 300-row dataset, loading 272 tensors) drown the step logs.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()

__all__ = ["FolderMaterializer", "HFDatasetMaterializer", "ReportMaterializer"]
