"""`datasets.Dataset` as Arrow files in the artifact store, with a content hash.

ZenML's own huggingface integration pins datasets<4, and its pandas
materializer has no content hash. This one stores the Arrow files written by
`save_to_disk` (columnar, no pickle) and hashes the table's content, so that
identical data gives the same hash and downstream steps hit the cache.
"""

from __future__ import annotations

import html
import json
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
        decode = _decoder(data)
        cols = [c for c in head.column_names if not (decode and c in TOKEN_COLUMNS)]
        headers = cols + (
            ["tokens (prompt masked from the loss, greyed; the trained response in bold)"] if decode else []
        )
        rows = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape(_short(r[c]))}</td>" for c in cols)
            + (f"<td style='white-space:pre-wrap'>{decode(r['input_ids'], r['labels'])}</td>" if decode else "")
            + "</tr>"
            for r in head
        )
        page = (
            f"<p>{len(data)} rows; first {len(head)} shown</p><table border='1' cellpadding='4' "
            f"style='border-collapse:collapse'><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in headers)}</tr>"
            f"{rows}</table>"
        )
        path = os.path.join(self.uri, "preview.html")
        with fileio.open(path, "w") as f:
            f.write(page)
        return {path.replace("\\", "/"): VisualizationType.HTML}


TOKEN_COLUMNS = ("input_ids", "labels")
IGNORE = -100  # label of a position with no loss (core/prompts.py)


def _short(value: Any, limit: int = 300) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict) and "content" in value[0]:  # messages
        text = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _decoder(data: Dataset):
    """decode(input_ids, labels) -> HTML, when the dataset is tokenized and names its tokenizer; else None."""
    if not all(c in data.column_names for c in TOKEN_COLUMNS):
        return None
    try:
        name = json.loads(data.info.description or "{}").get("tokenizer")
    except ValueError:
        return None
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception:  # the tokenizer is not on this machine: keep the plain preview
        return None

    def decode(ids: list[int], labels: list[int]) -> str:
        parts, start = [], 0
        for i in range(1, len(ids) + 1):  # runs of masked / trained tokens
            if i == len(ids) or (labels[i] == IGNORE) != (labels[start] == IGNORE):
                text = html.escape(tokenizer.decode(ids[start:i]))
                parts.append(f"<span style='color:#999'>{text}</span>" if labels[start] == IGNORE else f"<b>{text}</b>")
                start = i
        return "".join(parts)

    return decode
