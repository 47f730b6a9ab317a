"""`datasets.Dataset` as Arrow files in the artifact store, with a content hash.

ZenML's own huggingface integration pins datasets<4, and its pandas
materializer has no content hash. This one stores the Arrow files written by
`save_to_disk` (columnar, no pickle) and hashes the table's content, so that
identical data gives the same hash and downstream steps hit the cache.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from typing import Any, ClassVar

from datasets import Dataset
from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer
from zenml.utils import io_utils

from core.artifacts import dataset_content_hash

PREVIEW_ROWS = 20


class HFDatasetMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (Dataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def load(self, data_type: type[Any]) -> Dataset:
        local = tempfile.mkdtemp(prefix="zenml-dataset-")
        try:
            io_utils.copy_dir(os.path.join(self.uri, "data"), local)
            # keep_in_memory: the temp folder can go once loaded
            return Dataset.load_from_disk(local, keep_in_memory=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def save(self, data: Dataset) -> None:
        local = tempfile.mkdtemp(prefix="zenml-dataset-")
        try:
            data.flatten_indices().save_to_disk(local)
            io_utils.copy_dir(local, os.path.join(self.uri, "data"))
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def compute_content_hash(self, data: Dataset) -> str | None:
        return dataset_content_hash(data)

    def extract_metadata(self, data: Dataset) -> dict[str, Any]:
        return {"rows": len(data), "columns": list(data.column_names), "content_hash": dataset_content_hash(data)}

    def save_visualizations(self, data: Dataset) -> dict[str, VisualizationType]:
        head = data.select(range(min(PREVIEW_ROWS, len(data))))
        cols = head.column_names
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(r[c])[:300])}</td>" for c in cols) + "</tr>" for r in head
        )
        page = (
            f"<p>{len(data)} rows; first {len(head)} shown</p><table border='1' cellpadding='4' "
            f"style='border-collapse:collapse'><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in cols)}</tr>{rows}</table>"
        )
        path = os.path.join(self.uri, "preview.html")
        with fileio.open(path, "w") as f:
            f.write(page)
        return {path.replace("\\", "/"): VisualizationType.HTML}
