"""The upload folder, exactly as it will land in the Hub repo: the merged model at the root, the adapter under
`adapter/`, and the README.md model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from core.artifacts import ModelFolder

ADAPTER_DIR = "adapter"  # where the adapter lands in the repo (PeftModel.from_pretrained(..., subfolder=))


def weights_dtype(folder: Path) -> str:
    # transformers 5 writes `dtype` to config.json, 4.x wrote `torch_dtype`.
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown dtype"
    return str(config.get("dtype") or config.get("torch_dtype") or "unknown dtype")


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no disk for multi-GB shards; copy across filesystems. Never write to `dst`
    # in place afterwards: it would change `src` too.
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def uploadable(folder: Path) -> list[str]:
    # What upload_folder would send: it always skips .git and .cache/huggingface.
    files = sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def build_bundle(
    merged_dir: Path, adapter_dir: Path | None, card: ModelCard, out_dir: Path, base_model: str | None = None
) -> ModelFolder:
    """The exact repo content: merged model at the root, adapter under adapter/, README.md card.

    The adapter's own README.md (PEFT's placeholder card, with the local base path) is dropped, and
    `base_model_name_or_path` in adapter_config.json is set to `base_model` (a Hub id), so that
    `PeftModel.from_pretrained` from the Hub finds the base.
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not (merged_dir / "config.json").is_file() or not any(merged_dir.glob("*.safetensors")):
        raise ValueError(f"{merged_dir}: not a merged model folder (needs config.json and *.safetensors)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: bundle folder must be empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel in uploadable(merged_dir):
        if rel != "README.md":  # the card below replaces any README
            _link_or_copy(merged_dir / rel, out_dir / rel)
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        if not config_path.is_file():
            raise ValueError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
        for rel in uploadable(adapter_dir):
            if rel not in ("README.md", "adapter_config.json"):
                _link_or_copy(adapter_dir / rel, out_dir / ADAPTER_DIR / rel)
        config = json.loads(config_path.read_text())
        if base_model:
            config["base_model_name_or_path"] = base_model
        # A new file, not an edit of a hard link to the source.
        (out_dir / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card.save(out_dir / "README.md")
    return ModelFolder(out_dir)
