"""Step 7: push the merged model, the LoRA adapter and a model card to the Hugging Face Hub.

The upload folder is built first, exactly as it will land in the repo: the merged model at the
root, the adapter under `adapter/`, and a README.md model card (huggingface_hub's ModelCard).
- dry_run (the offline default) uploads nothing: the folder is the `upload_bundle` artifact.
- hub publishes it so that main is never half-written (see publish_bundle): upload to a fresh
  `candidate/...` branch, check every file's size and hash there, then copy it onto main in one
  commit (push.publish: main) or open a pull request with it (push.publish: pr), and delete the
  candidate branch. Main then holds exactly the upload folder (plus the Hub's .gitattributes).
  Transient Hub errors (HTTP 408/429/5xx, timeouts, dropped connections) are retried with backoff.

The token comes from the ZenML secret `push.token_secret` (key `token`), else HF_TOKEN. It is
never logged, never written to an artifact, the card or metadata, and masked in error messages.
"""

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

# What huggingface_hub's own http_backoff retries (huggingface-hub is pinned): these statuses, and timeouts, network
# errors and dropped connections. The library applies it to preupload, LFS/xet transfers and tree listings only;
# create_repo, branches, paths-info and the commit itself are single requests, so with_retries covers those.
from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_EXCEPTIONS as RETRY_EXCEPTIONS
from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_STATUS_CODES as RETRY_STATUS
from zenml import get_step_context, log_metadata, step
from zenml.config.cache_policy import CachePolicy
from zenml.logger import get_logger

import materializers  # noqa: F401  (registers the project's materializers)
from core import models as models_module
from core.artifacts import HtmlReport, ModelFolder, html_table, scratch_dir
from core.config import LoraSettings, ModelSource, PushConfig, TrainConfig
from core.models import display_name
from core.reports import EvalReport, ModelScores, TrainMetrics

logger = get_logger(__name__)

ADAPTER_DIR = "adapter"  # where the adapter lands in the repo (PeftModel.from_pretrained(..., subfolder=))
MASK = "***"
KEEP_REMOTE = frozenset({".gitattributes"})  # the Hub's own file in every repo: not ours to delete or verify
MAX_RETRY_WAIT_S = 30.0  # cap on one backoff wait, seconds

# metric field -> (model-index metric type, pretty name, digits shown in the card)
METRICS: dict[str, tuple[str, str, int]] = {
    "loss": ("loss", "Eval loss (nats/token)", 4),
    "perplexity": ("perplexity", "Perplexity", 3),
    "rouge_l": ("rouge", "ROUGE-L F1", 4),
    "exact_match": ("exact_match", "Exact match", 4),
}

# Rendered by ModelCard.from_template; `card_data` is the YAML header from ModelCardData.
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

`{{ base_name }}` fine-tuned with {{ method }} by a [ZenML](https://zenml.io) pipeline
(ingest, validate, format prompts, train, evaluate against the base model, merge, push).
This repo holds the merged model ({{ merged_dtype }}){% if push_adapter %} and, under `adapter/`, the LoRA adapter alone{% endif %}.

## Evaluation

Held-out rows: {{ eval_rows }} (dataset sha256 `{{ eval_hash }}`).

| metric | {{ score_columns | join(" | ") }} |
|---|{% for _ in score_columns %}---|{% endfor %}
{% for row in score_rows %}| {{ row | join(" | ") }} |
{% endfor %}
Quality gate against {{ reference_name }}: **{{ gate }}**
{% for message in gate_messages %}
- {{ message }}
{%- endfor %}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}")
```
{% if push_adapter %}
The adapter alone, on top of the base model:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{{ base_name }}")
model = PeftModel.from_pretrained(base, "{{ repo_id }}", subfolder="adapter")
```
{% endif %}
## LoRA settings

| setting | value |
|---|---|
{% for row in lora_rows %}| {{ row | join(" | ") }} |
{% endfor %}
## Training

| setting | value |
|---|---|
{% for row in train_rows %}| {{ row | join(" | ") }} |
{% endfor %}
## Provenance

- ZenML pipeline run: `{{ run_id }}`
- Base model: `{{ base_name }}`
"""


class PushError(RuntimeError):
    """A Hub push failed. The message never holds the token; `status_code` is the HTTP status, if any."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class PushResult(HtmlReport):
    mode: str  # dry_run or hub
    repo_id: str | None
    files: list[str]  # paths in the repo (or that would be), sorted
    total_bytes: int  # sum of the file sizes, bytes
    commit_url: str | None = None  # hub mode only
    commit_oid: str | None = None  # hub mode only
    revision: str | None = None  # hub mode: "main", or the pull request's "refs/pr/N" (push.publish: pr)
    pr_url: str | None = None  # push.publish: pr only
    promoted_to: str | None = None  # ZenML model stage set by this step, if any

    def to_html(self) -> str:
        summary = html_table(
            ["field", "value"],
            [[k, v] for k, v in self.model_dump(exclude={"files"}).items()],
        )
        return f"<h3>Push ({self.mode})</h3>{summary}<h4>{len(self.files)} files</h4>" + html_table(
            ["file"], [[f] for f in self.files]
        )


def mask_token(text: str, token: str | None) -> str:
    """`text` with every occurrence of `token` replaced by ***."""
    return text.replace(token, MASK) if token else text


def resolve_token(push: PushConfig) -> str | None:
    """The Hub token: ZenML secret `push.token_secret` (key `token`), else the HF_TOKEN env var."""
    if push.token_secret:
        from zenml.client import Client

        try:
            secret = Client().get_secret(
                push.token_secret, allow_partial_name_match=False, allow_partial_id_match=False
            )
        except (KeyError, NotImplementedError):
            # No such secret (or no secrets store): not an error, HF_TOKEN may still be set.
            logger.info("No ZenML secret '%s'; using HF_TOKEN if set.", push.token_secret)
        else:
            token = secret.secret_values.get("token")
            if token:
                logger.info("Hub token: from ZenML secret '%s'.", push.token_secret)
                return token
            logger.warning("ZenML secret '%s' has no key 'token'; using HF_TOKEN if set.", push.token_secret)
    token = os.environ.get("HF_TOKEN") or None
    if token:
        logger.info("Hub token: from HF_TOKEN.")
    return token


def _cell(value: object) -> str:
    # Markdown table cells: a pipe or newline would break the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _score_table(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    columns = ["base", "fine-tuned", "change vs base"]
    reference = report.reference if report.reference is not None and report.reference_name != "base" else None
    if reference is not None:
        columns.append(report.reference_name)
    rows = []
    for field, (_, pretty, digits) in METRICS.items():
        base, tuned = getattr(report.base, field), getattr(report.tuned, field)
        row = [pretty, f"{base:.{digits}f}", f"{tuned:.{digits}f}", f"{tuned - base:+.{digits}f}"]
        if reference is not None:
            row.append(f"{getattr(reference, field):.{digits}f}")
        rows.append([_cell(c) for c in row])
    return columns, rows


def _is_hub_id(model: ModelSource) -> bool:
    # A local folder's path is not a Hub model id: the Hub's metadata check would reject it as base_model.
    return model.source != "local"


def build_model_card(
    *,
    model: ModelSource,
    lora: LoraSettings,
    train: TrainConfig,
    push: PushConfig,
    eval_report: EvalReport,
    train_metrics: TrainMetrics,
    run_id: str | None,
    merged_dtype: str = "unknown dtype",
) -> ModelCard:
    """The README.md: Hub metadata (base model, license, tags, eval results) and a human-readable body."""
    base_name = display_name(model)
    repo_id = push.repo_id or "<your-org>/<repo>"
    model_name = repo_id.split("/")[-1]
    dataset_id = push.dataset_name or "custom"
    scores: ModelScores = eval_report.tuned
    eval_results = [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=dataset_id,
            dataset_name=push.dataset_name or f"held-out split ({eval_report.eval_rows} rows)",
            dataset_split="eval",
            metric_type=metric_type,
            metric_name=pretty,
            metric_value=round(getattr(scores, field), digits),
        )
        for field, (metric_type, pretty, digits) in METRICS.items()
    ]
    card_data = ModelCardData(
        base_model=base_name if _is_hub_id(model) else None,
        library_name="transformers",
        license=push.license,
        tags=list(push.tags),
        datasets=[push.dataset_name] if push.dataset_name else None,
        pipeline_tag="text-generation",
        metrics=sorted({metric_type for metric_type, _, _ in METRICS.values()}),
        model_name=model_name,
        eval_results=eval_results,
    )
    columns, score_rows = _score_table(eval_report)
    scale = (
        f"alpha/sqrt(r) = {lora.alpha / lora.r**0.5:.3g}" if lora.use_rslora else f"alpha/r = {lora.alpha / lora.r:.3g}"
    )
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    lora_rows = [
        ["rank r", lora.r],
        ["alpha", lora.alpha],
        ["scale", scale],
        ["dropout", lora.dropout],
        ["target modules", targets],
        ["DoRA", lora.use_dora],
        ["rsLoRA", lora.use_rslora],
    ]
    tm = train_metrics
    train_rows = [
        ["optimizer steps", tm.steps],
        ["max steps / epochs", f"{train.max_steps} / {train.num_epochs}"],
        ["learning rate", train.learning_rate],
        ["schedule", f"{train.lr_scheduler}, warmup ratio {train.warmup_ratio}"],
        ["batch (micro x grad accum)", f"{train.micro_batch_size} x {train.grad_accum}"],
        ["weight decay", train.weight_decay],
        ["optimizer", train.optim],
        ["gradient checkpointing", train.gradient_checkpointing],
        ["seed", train.seed],
        ["final train loss", f"{tm.final_train_loss:.4f}"],
        ["final eval loss", "n/a" if tm.final_eval_loss is None else f"{tm.final_eval_loss:.4f}"],
        ["trainable / total params", f"{tm.trainable_params:,} / {tm.total_params:,}"],
        ["tokens trained (non-pad)", f"{tm.train_tokens:,}"],
        ["throughput (tokens/s)", f"{tm.tokens_per_s:.1f}"],
        ["wall time (s)", f"{tm.seconds:.1f}"],
        ["device / compute dtype", f"{tm.device} / {tm.compute_dtype}"],
    ]
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=model_name,
        base_name=base_name,
        method="QLoRA with DoRA" if lora.use_dora else "QLoRA",
        merged_dtype=merged_dtype,
        push_adapter=push.push_adapter,
        repo_id=repo_id,
        eval_rows=eval_report.eval_rows,
        eval_hash=eval_report.eval_dataset_hash,
        score_columns=columns,
        score_rows=score_rows,
        reference_name=eval_report.reference_name,
        gate="passed" if eval_report.gate_passed else "failed",
        gate_messages=[_cell(m) for m in eval_report.gate_messages],
        lora_rows=[[_cell(c) for c in row] for row in lora_rows],
        train_rows=[[_cell(c) for c in row] for row in train_rows],
        run_id=run_id or "n/a (not run by ZenML)",
    )


def _weights_dtype(folder: Path) -> str:
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


def _uploadable(folder: Path) -> list[str]:
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
    for rel in _uploadable(merged_dir):
        if rel != "README.md":  # the card below replaces any README
            _link_or_copy(merged_dir / rel, out_dir / rel)
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        if not config_path.is_file():
            raise ValueError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
        for rel in _uploadable(adapter_dir):
            if rel not in ("README.md", "adapter_config.json"):
                _link_or_copy(adapter_dir / rel, out_dir / ADAPTER_DIR / rel)
        config = json.loads(config_path.read_text())
        if base_model:
            config["base_model_name_or_path"] = base_model
        # A new file, not an edit of a hard link to the source.
        (out_dir / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card.save(out_dir / "README.md")
    return ModelFolder(out_dir)


def _status(err: BaseException) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def is_transient(err: BaseException) -> bool:
    """An error worth retrying: HTTP 408/429/5xx, a timeout, a network error or a dropped connection."""
    if isinstance(err, HfHubHTTPError):
        return _status(err) in RETRY_STATUS
    return isinstance(err, RETRY_EXCEPTIONS)


def _describe(err: BaseException, token: str | None) -> str:
    return mask_token(f"{type(err).__name__}: {err}", token)


def with_retries(what: str, call, push: PushConfig, token: str | None, already_done=None):
    """call(), retried on transient errors: push.max_retries times, waiting push.retry_wait_s, then twice as long...

    `already_done`, if given, runs before each retry; a result other than None means the failed attempt took effect
    after all (only its answer was lost) and is returned instead of repeating a call that is not idempotent.
    """
    for attempt in range(push.max_retries + 1):
        try:
            return call()
        except Exception as err:
            if attempt >= push.max_retries or not is_transient(err):
                raise
            wait = min(push.retry_wait_s * 2**attempt, MAX_RETRY_WAIT_S)
            logger.warning(
                "Hub: %s failed (%s); retry %d of %d in %.1f s.",
                what,
                _describe(err, token)[:300],
                attempt + 1,
                push.max_retries,
                wait,
            )
        time.sleep(wait)
        if already_done is not None and (done := already_done()) is not None:
            return done
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _file_id(path: Path, lfs: bool) -> str:
    """What the Hub lists as a file's content id: the sha256 of an LFS file, else its git blob sha1."""
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def remote_problems(api: HfApi, repo_id: str, revision: str, folder: Path, files: list[str]) -> list[str]:
    """How `revision` differs from `folder`: missing, extra, resized or changed files (none: identical).

    Sizes and hashes come from the Hub's tree listing; local hashes are computed to match (LFS: sha256, else the
    git blob sha1), so nothing is downloaded.
    """
    remote = {
        e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(e, RepoFile)
    }
    problems = []
    for rel in files:
        entry, local = remote.get(rel), folder / rel
        if entry is None:
            problems.append(f"{rel}: missing")
        elif entry.size != local.stat().st_size:
            problems.append(f"{rel}: {entry.size} bytes, expected {local.stat().st_size}")
        elif (entry.lfs.sha256 if entry.lfs else entry.blob_id) != _file_id(local, lfs=entry.lfs is not None):
            problems.append(f"{rel}: content differs (same size)")
    problems += [f"{rel}: not in the upload folder" for rel in sorted(set(remote) - set(files) - KEEP_REMOTE)]
    return problems


def _stale(api: HfApi, repo_id: str, revision: str, files: list[str]) -> list[CommitOperationDelete]:
    # Files at `revision` that the upload folder no longer has (e.g. shards of an earlier, differently split model).
    present = set(api.list_repo_files(repo_id, revision=revision))
    return [CommitOperationDelete(path_in_repo=rel) for rel in sorted(present - set(files) - KEEP_REMOTE)]


@dataclass
class Published:
    commit_url: str
    commit_oid: str
    revision: str  # "main" or "refs/pr/N"
    pr_url: str | None = None


def publish_bundle(
    bundle: ModelFolder, push: PushConfig, token: str, commit_message: str, run_id: str | None = None
) -> Published:
    """Publish the upload folder so that main is never left half-written, and verify what landed.

    1. create the repo if needed, note main's head commit;
    2. branch `candidate/<run>-<random>` from that commit and commit the folder to it (files main has that the
       folder lacks are deleted there), however many requests and retries the upload takes;
    3. list the branch and compare every file's size and hash with the folder;
    4. publish: main (one commit of server-side copies from the branch, with main's noted head as parent, so a
       concurrent push to main fails it instead of being overwritten) or pr (the same commit as a pull request);
    5. verify the result the same way, delete the candidate branch.
    A failure anywhere before step 4 leaves main untouched; the candidate branch is deleted either way.
    Errors come back as PushError, the token masked, saying what main looks like afterwards.
    """
    api = HfApi(endpoint=push.endpoint, token=token)
    files = _uploadable(bundle.path)
    repo_id, base, candidate, stage = push.repo_id, None, None, "creating the repo"

    def retry(what, call, already_done=None):
        return with_retries(what, call, push, token, already_done)

    def landed() -> Published | None:
        # After a lost answer: did our commit reach main? main moved and matches the folder -> it did.
        head = api.repo_info(repo_id, revision="main").sha
        if head == base:
            return None
        problems = remote_problems(api, repo_id, "main", bundle.path, files)
        if problems:
            raise PushError(
                f"main moved while publishing (someone else pushed? main is now at {head[:8]}); this upload was "
                f"not published: {'; '.join(problems[:5])}"
            )
        return Published(f"{api.endpoint}/{repo_id}/commit/{head}", head, "main")

    try:
        # private only applies when the repo is created; an existing repo keeps its visibility.
        repo_id = retry(
            "create repo", lambda: api.create_repo(push.repo_id, private=push.private, exist_ok=True)
        ).repo_id
        base = retry("read main", lambda: api.repo_info(repo_id, revision="main")).sha
        candidate = f"candidate/{(run_id or 'manual')[:8]}-{secrets.token_hex(4)}"
        stage = f"creating branch {candidate}"
        # exist_ok: a retry after a lost answer finds the branch it made (the random suffix rules out anyone else's)
        retry(stage, lambda: api.create_branch(repo_id, branch=candidate, revision=base, exist_ok=True))
        stage = f"uploading to {candidate}"
        logger.info("Uploading %d files to branch %s of %s (main stays at %s).", len(files), candidate, repo_id, base)
        retry(
            stage,
            # operations are built per attempt: a committed CommitOperationAdd cannot be reused, and after a lost
            # answer the files already there are skipped (unchanged hash) and nothing is left to delete
            lambda: api.create_commit(
                repo_id,
                operations=[CommitOperationAdd(rel, bundle.path / rel) for rel in files]
                + _stale(api, repo_id, candidate, files),
                commit_message=f"{commit_message} (candidate)",
                revision=candidate,
            ),
        )
        stage = f"verifying {candidate}"
        problems = remote_problems(api, repo_id, candidate, bundle.path, files)  # listing: retried by the library
        if problems:
            raise PushError(f"branch {candidate} does not match the upload folder: {'; '.join(problems[:10])}")
        logger.info("Verified branch %s: all %d files match the upload folder in size and hash.", candidate, len(files))

        def copy_ops() -> list:  # onto main: server-side copies from the verified branch, main's stale files deleted
            copies = [CommitOperationCopy(rel, rel, src_revision=candidate) for rel in files]
            return copies + _stale(api, repo_id, "main", files)

        if push.publish == "pr":
            stage = "opening a pull request"
            # A lost answer here may leave a second, identical pull request: harmless, and visible.
            info = retry(
                stage,
                lambda: api.create_commit(
                    repo_id, operations=copy_ops(), commit_message=commit_message, create_pr=True
                ),
            )
            # no pull request when main already holds exactly this content (nothing to commit)
            done = Published(info.commit_url, info.oid, info.pr_revision or "main", info.pr_url)
        else:
            stage = "publishing to main"
            try:
                info = retry(
                    stage,
                    lambda: api.create_commit(
                        repo_id,
                        operations=copy_ops(),
                        commit_message=commit_message,
                        revision="main",
                        parent_commit=base,
                    ),
                    already_done=landed,
                )
            except HfHubHTTPError as err:
                if _status(err) != 412:  # 412: main's head is no longer `base`
                    raise
                info = landed()
                if info is None:
                    raise
            done = info if isinstance(info, Published) else Published(info.commit_url, info.oid, "main")
        stage = f"verifying {done.revision}"
        problems = remote_problems(api, repo_id, done.revision, bundle.path, files)
        if problems:
            raise PushError(f"{done.revision} does not match the upload folder: {'; '.join(problems[:10])}")
    except Exception as err:
        if candidate is not None:
            _delete_candidate(api, repo_id, candidate, push, token)
        where = f" while {stage}" if stage else ""
        message = err.args[0] if isinstance(err, PushError) else _describe(err, token)
        raise PushError(
            f"push to Hub repo '{push.repo_id}' failed{where}: {mask_token(message, token)}; "
            f"{_main_state(api, repo_id, base, token)}",
            status_code=_status(err),
        ) from None  # from None: the original exception's text may hold the token (e.g. echoed by a proxy)
    logger.info("Published %s to %s of %s (commit %s).", candidate, done.revision, repo_id, done.commit_oid)
    _delete_candidate(api, repo_id, candidate, push, token)
    return done


def _delete_candidate(api: HfApi, repo_id: str, candidate: str, push: PushConfig, token: str | None) -> None:
    try:
        with_retries(f"delete branch {candidate}", lambda: api.delete_branch(repo_id, branch=candidate), push, token)
    except Exception as err:  # the upload's outcome stands either way; only a stray branch is left
        logger.warning(
            "Could not delete branch %s of %s (%s); delete it by hand.", candidate, repo_id, _describe(err, token)
        )
    else:
        logger.info("Deleted branch %s.", candidate)


def _main_state(api: HfApi, repo_id: str, base: str | None, token: str | None) -> str:
    """What main looks like after a failed push, checked rather than assumed."""
    if base is None:
        return "nothing was uploaded"
    try:
        head = api.repo_info(repo_id, revision="main").sha
    except Exception as err:
        return f"could not read main afterwards ({_describe(err, token)[:200]}): check it by hand"
    return "main is unchanged" if head == base else f"main moved from {base[:8]} to {head[:8]}: check it"


def push_model(
    merged_model: ModelFolder,
    adapter: ModelFolder | None,
    eval_report: EvalReport,
    train_metrics: TrainMetrics,
    *,
    model: ModelSource,
    lora: LoraSettings,
    train: TrainConfig,
    push: PushConfig,
    run_id: str | None = None,
    out_dir: str | Path | None = None,
) -> tuple[ModelFolder, PushResult]:
    """Build the upload folder and, in hub mode, upload it. Returns the folder and a PushResult."""
    token = None
    if push.mode == "hub":
        # Before any work: a missing token should fail fast, not after building the bundle.
        token = resolve_token(push)
        if not token:
            raise PushError(
                f"push.mode is 'hub' but no Hugging Face token was found: create a ZenML secret "
                f"'{push.token_secret or 'huggingface'}' with key 'token' "
                f"(zenml secret create {push.token_secret or 'huggingface'} --token=...), or set HF_TOKEN. "
                "Use push.mode: dry_run to build the upload folder without uploading."
            )
    card = build_model_card(
        model=model,
        lora=lora,
        train=train,
        push=push,
        eval_report=eval_report,
        train_metrics=train_metrics,
        run_id=run_id,
        merged_dtype=_weights_dtype(merged_model.path),
    )
    out = Path(out_dir) if out_dir is not None else scratch_dir("zenml-push-bundle-")
    bundle = build_bundle(
        merged_model.path,
        adapter.path if (adapter is not None and push.push_adapter) else None,
        card,
        out,
        base_model=display_name(model) if _is_hub_id(model) else None,
    )
    files = _uploadable(bundle.path)
    total = sum((bundle.path / f).stat().st_size for f in files)
    listing = "\n".join(f"  {f} ({(bundle.path / f).stat().st_size:,} B)" for f in files)
    result = PushResult(mode=push.mode, repo_id=push.repo_id, files=files, total_bytes=total)
    if push.mode == "dry_run":
        logger.info(
            "Dry run: nothing uploaded. %d files (%.1f MB) would go to %s:\n%s",
            len(files),
            total / 1e6,
            push.repo_id or "<push.repo_id>",
            listing,
        )
        return bundle, result
    logger.info("Uploading %d files (%.1f MB) to %s:\n%s", len(files), total / 1e6, push.repo_id, listing)
    message = f"ZenML run {run_id}: {display_name(model)} + LoRA r={lora.r}" if run_id else "Upload from ZenML"
    published = publish_bundle(bundle, push, token, message, run_id=run_id)
    logger.info("Pushed to %s (%s).", published.pr_url or published.commit_url, published.revision)
    return bundle, result.model_copy(
        update={
            "commit_url": published.commit_url,
            "commit_oid": published.commit_oid,
            "revision": published.revision,
            "pr_url": published.pr_url,
        }
    )


# Cacheable: a hit means these exact inputs were already built (and, in hub mode,
# uploaded and promoted) by the run it hits. Any changed input, setting or
# mode re-runs it.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], models_module]))
def push(
    merged_model: ModelFolder,
    adapter: ModelFolder,
    eval_report: EvalReport,
    train_metrics: TrainMetrics,
    model: ModelSource,
    lora: LoraSettings,
    train: TrainConfig,
    push: PushConfig,
    promote_to: str | None = None,
) -> tuple[Annotated[ModelFolder, "upload_bundle"], Annotated[PushResult, "push_result"]]:
    """Build the Hub upload folder (and upload it in hub mode); promote the model version if the gate passed."""
    context = get_step_context()
    bundle, result = push_model(
        merged_model,
        adapter,
        eval_report,
        train_metrics,
        model=model,
        lora=lora,
        train=train,
        push=push,
        run_id=str(context.pipeline_run.id),
    )
    if context.model_version is None:
        if promote_to:
            logger.warning("No ZenML model on this step or pipeline: nothing to promote or annotate.")
        return bundle, result
    if promote_to and eval_report.gate_passed:
        context.model.set_stage(promote_to, force=True)
        result = result.model_copy(update={"promoted_to": promote_to})
        logger.info("Model version promoted to '%s'.", promote_to)
    elif promote_to:
        logger.info("Quality gate failed: model version not promoted to '%s'.", promote_to)
    log_metadata(
        metadata={
            "push": {
                "mode": result.mode,
                "repo_id": result.repo_id or "",
                "file_count": len(result.files),
                "total_bytes": result.total_bytes,
                "commit_url": result.commit_url or "",
                "commit_oid": result.commit_oid or "",
                "revision": result.revision or "",
                "pr_url": result.pr_url or "",
                "promoted_to": result.promoted_to or "",
            }
        },
        infer_model=True,
    )
    return bundle, result
