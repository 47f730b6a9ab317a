"""Typed pydantic reports that also render as HTML in the ZenML dashboard."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from zenml.enums import VisualizationType
from zenml.io import fileio
from zenml.materializers.pydantic_materializer import PydanticMaterializer

from core.artifacts import HtmlReport


class ReportMaterializer(PydanticMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (HtmlReport,)

    def save_visualizations(self, data: HtmlReport) -> dict[str, VisualizationType]:
        visualizations = super().save_visualizations(data)
        path = os.path.join(self.uri, "report.html")
        with fileio.open(path, "w") as f:
            f.write(data.to_html())
        visualizations[path.replace("\\", "/")] = VisualizationType.HTML
        return visualizations
