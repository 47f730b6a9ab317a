"""Folder artifacts (adapter, merged model, upload bundle) copied through ZenML fileio.

fileio talks to whatever artifact store the stack has (local disk, S3, GCS),
so a step on another machine or pod gets the same folder back.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.materializers.base_materializer import BaseMaterializer
from zenml.utils import io_utils

from core.artifacts import ModelFolder, scratch_dir

# Hashing reads every byte; above this size (bytes) ZenML falls back to the artifact id.
HASH_LIMIT = 2 * 1024**3


class FolderMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ModelFolder,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def load(self, data_type: type[Any]) -> ModelFolder:
        # A fresh local folder per load: callers may read it after the step returns.
        local = str(scratch_dir("zenml-folder-"))
        io_utils.copy_dir(os.path.join(self.uri, "folder"), local)
        return ModelFolder(local)

    def save(self, data: ModelFolder) -> None:
        io_utils.copy_dir(str(data.path), os.path.join(self.uri, "folder"))

    def compute_content_hash(self, data: ModelFolder) -> str | None:
        if data.size_bytes() > HASH_LIMIT:
            return None
        h = hashlib.sha256()
        for rel in data.files():
            h.update(rel.encode() + b"\0")
            with open(data.path / rel, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        return h.hexdigest()

    def extract_metadata(self, data: ModelFolder) -> dict[str, Any]:
        return {"files": data.files(), "size_bytes": data.size_bytes()}
