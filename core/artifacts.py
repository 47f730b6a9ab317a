"""Artifact types passed between steps that are not plain data frames."""

from __future__ import annotations

import atexit
import hashlib
import html
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the process exits.

    Step outputs and materializer loads must outlive the function that made
    them (ZenML copies or reads them afterwards), so they cannot use a
    context manager; without this they would pile up in /tmp, a merged 8B
    model at 16 GB each.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class ModelFolder:
    """A folder artifact: a LoRA adapter, a merged model, or a Hub upload bundle.

    Stored by `materializers.FolderMaterializer`, which copies the folder
    through ZenML's fileio so it works on any artifact store (local, S3, GCS).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def files(self) -> list[str]:
        """Relative paths of every file, sorted."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"


class HtmlReport(BaseModel):
    """A typed report that the ZenML dashboard renders as HTML (see ReportMaterializer)."""

    def to_html(self) -> str:  # subclasses override with something nicer
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in self.model_dump().items()
        )
        return f"<table>{rows}</table>"


def html_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain HTML table with escaped cells, for report visualizations."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"


def dataset_content_hash(data) -> str:
    """sha256 of the schema and rows, independent of chunking and file layout."""
    table = data.with_format(None).data.table
    if data._indices is not None:  # a select/shuffle/filter view: hash what it shows
        table = data.flatten_indices().data.table
    table = table.combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 30)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
