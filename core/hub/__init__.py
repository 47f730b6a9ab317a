"""The Hub push: build the upload folder (card + bundle) and, in hub mode, publish it (core/hub/publish.py).

dry_run (the offline default) uploads nothing: the folder is the `upload_bundle` artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.artifacts import ModelFolder, scratch_dir
from core.config import DataSource, LoraSettings, ModelSource, PushConfig, TrainConfig
from core.hub.bundle import build_bundle, uploadable, weights_dtype
from core.hub.card import build_model_card, is_hub_id
from core.hub.publish import Published, PushError, publish_bundle, resolve_token
from core.models import BaseModelRef, display_name
from core.reports import EvalReport, PushResult, TrainMetrics

logger = logging.getLogger(__name__)

__all__ = ["PushError", "PushResult", "push_model"]


def push_model(
    merged_model: ModelFolder,
    adapter: ModelFolder | None,
    eval_report: EvalReport,
    train_metrics: TrainMetrics,
    *,
    model: ModelSource | BaseModelRef,
    lora: LoraSettings,
    train: TrainConfig,
    push: PushConfig,
    run_id: str | None = None,
    out_dir: str | Path | None = None,
    data: DataSource | None = None,
) -> tuple[ModelFolder, PushResult]:
    """Build the upload folder and, in hub mode, upload it. Returns the folder and a PushResult. `data`: the task's
    data source, for the card's data mixture row."""
    # Before any work: a missing token should fail fast, not after building the bundle.
    token = _require_token(push) if push.mode == "hub" else None
    card = build_model_card(
        model=model,
        lora=lora,
        train=train,
        push=push,
        eval_report=eval_report,
        train_metrics=train_metrics,
        run_id=run_id,
        merged_dtype=weights_dtype(merged_model.path),
        data=data,
    )
    out = Path(out_dir) if out_dir is not None else scratch_dir("zenml-push-bundle-")
    bundle = build_bundle(
        merged_model.path,
        adapter.path if (adapter is not None and push.push_adapter) else None,
        card,
        out,
        base_model=display_name(model) if is_hub_id(model) else None,
    )
    files = uploadable(bundle.path)
    total = sum((bundle.path / f).stat().st_size for f in files)
    result = PushResult(mode=push.mode, repo_id=push.repo_id, files=files, total_bytes=total)
    if push.mode == "dry_run":
        logger.info(
            "Dry run: nothing uploaded. %d files (%.1f MB) would go to %s:\n%s",
            len(files),
            total / 1e6,
            push.repo_id or "<push.repo_id>",
            _listing(bundle, files),
        )
        return bundle, result
    logger.info(
        "Uploading %d files (%.1f MB) to %s:\n%s", len(files), total / 1e6, push.repo_id, _listing(bundle, files)
    )
    message = f"ZenML run {run_id}: {display_name(model)} + LoRA r={lora.r}" if run_id else "Upload from ZenML"
    published = publish_bundle(bundle, push, token, message, run_id=run_id)
    logger.info("Pushed to %s (%s).", published.pr_url or published.commit_url, published.revision)
    return bundle, _with_commit(result, published)


def _require_token(push: PushConfig) -> str:
    """The Hub token for hub mode; PushError saying where to put one when there is none."""
    token = resolve_token(push)
    if not token:
        raise PushError(
            f"push.mode is 'hub' but no Hugging Face token was found: create a ZenML secret "
            f"'{push.token_secret or 'huggingface'}' with key 'token' "
            f"(zenml secret create {push.token_secret or 'huggingface'} --token=...), or set HF_TOKEN. "
            "Use push.mode: dry_run to build the upload folder without uploading."
        )
    return token


def _listing(bundle: ModelFolder, files: list[str]) -> str:
    """The upload folder's files with their sizes, one indented line each, for the log."""
    return "\n".join(f"  {f} ({(bundle.path / f).stat().st_size:,} B)" for f in files)


def _with_commit(result: PushResult, published: Published) -> PushResult:
    """The PushResult with where the upload landed: commit, revision, pull request."""
    return result.model_copy(
        update={
            "commit_url": published.commit_url,
            "commit_oid": published.commit_oid,
            "revision": published.revision,
            "pr_url": published.pr_url,
        }
    )
