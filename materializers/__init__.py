"""ZenML materializers for this project's artifacts. Importing registers them."""

from materializers.dataset_materializer import HFDatasetMaterializer
from materializers.folder_materializer import FolderMaterializer
from materializers.report_materializer import ReportMaterializer

__all__ = ["FolderMaterializer", "HFDatasetMaterializer", "ReportMaterializer"]
