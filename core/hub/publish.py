"""Publishing an upload folder to the Hugging Face Hub so that main is never half-written.

Upload to a fresh `candidate/...` branch, check every file's size and hash there, then copy it onto main in
one commit (push.publish: main) or open a pull request with it (push.publish: pr), and delete the candidate
branch. Main then holds exactly the upload folder (plus the Hub's .gitattributes). Transient Hub errors
(HTTP 408/429/5xx, timeouts, dropped connections) are retried with backoff.

The token comes from the ZenML secret `push.token_secret` (key `token`), else HF_TOKEN. It is never logged,
never written to an artifact, the card or metadata, and masked in error messages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile

# What huggingface_hub's own http_backoff retries (huggingface-hub is pinned): these statuses, and timeouts, network
# errors and dropped connections. The library applies it to preupload, LFS/xet transfers and tree listings only;
# create_repo, branches, paths-info and the commit itself are single requests, so with_retries covers those.
from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_EXCEPTIONS as RETRY_EXCEPTIONS
from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_STATUS_CODES as RETRY_STATUS

from core.artifacts import ModelFolder
from core.config import PushConfig
from core.hub.bundle import uploadable
from core.logs import mask_secrets

logger = logging.getLogger(__name__)


KEEP_REMOTE = frozenset({".gitattributes"})  # the Hub's own file in every repo: not ours to delete or verify

MAX_RETRY_WAIT_S = 30.0  # cap on one backoff wait, seconds


class PushError(RuntimeError):
    """A Hub push failed. The message never holds the token; `status_code` is the HTTP status, if any."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


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


def _status(err: BaseException) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def is_transient(err: BaseException) -> bool:
    """An error worth retrying: HTTP 408/429/5xx, a timeout, a network error or a dropped connection."""
    if isinstance(err, HfHubHTTPError):
        return _status(err) in RETRY_STATUS
    return isinstance(err, RETRY_EXCEPTIONS)


def _describe(err: BaseException, token: str | None) -> str:
    return mask_secrets(f"{type(err).__name__}: {err}", token)


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


@dataclass
class _Publish:
    """One publish in progress: what its stages share, and how far it got (for the error message)."""

    api: HfApi
    push: PushConfig
    token: str | None
    folder: Path
    files: list[str]
    repo_id: str
    base: str | None = None  # main's head commit before anything was uploaded
    candidate: str | None = None  # the candidate branch, once named
    stage: str = "creating the repo"

    def retry(self, what: str, call, already_done=None):
        """call(), retried on transient Hub errors (with_retries with this push's settings)."""
        return with_retries(what, call, self.push, self.token, already_done)


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
    job = _Publish(api, push, token, bundle.path, uploadable(bundle.path), push.repo_id)
    try:
        _open_repo(job)
        _upload_candidate(job, commit_message, run_id)
        _verify_candidate(job)
        publish = _open_pull_request if push.publish == "pr" else _publish_to_main
        done = publish(job, commit_message)
        _verify(job, done.revision, what=done.revision)
    except Exception as err:
        if job.candidate is not None:
            _delete_candidate(api, job.repo_id, job.candidate, push, token)
        # from None: the original exception's text may hold the token (e.g. echoed by a proxy)
        raise _failed(job, err) from None
    logger.info("Published %s to %s of %s (commit %s).", job.candidate, done.revision, job.repo_id, done.commit_oid)
    _delete_candidate(api, job.repo_id, job.candidate, push, token)
    return done


def _open_repo(job: _Publish) -> None:
    """Create the repo if it is new (push.private applies only then) and note main's head: the publish's parent."""
    job.repo_id = job.retry(
        "create repo", lambda: job.api.create_repo(job.push.repo_id, private=job.push.private, exist_ok=True)
    ).repo_id
    job.base = job.retry("read main", lambda: job.api.repo_info(job.repo_id, revision="main")).sha


def _upload_candidate(job: _Publish, commit_message: str, run_id: str | None) -> None:
    """Branch candidate/<run>-<random> from main's head and commit the whole folder to it, main's extras deleted."""
    job.candidate = candidate = f"candidate/{(run_id or 'manual')[:8]}-{secrets.token_hex(4)}"
    api, repo_id, files = job.api, job.repo_id, job.files
    job.stage = f"creating branch {candidate}"
    # exist_ok: a retry after a lost answer finds the branch it made (the random suffix rules out anyone else's)
    job.retry(job.stage, lambda: api.create_branch(repo_id, branch=candidate, revision=job.base, exist_ok=True))
    job.stage = f"uploading to {candidate}"
    logger.info("Uploading %d files to branch %s of %s (main stays at %s).", len(files), candidate, repo_id, job.base)
    job.retry(
        job.stage,
        # operations are built per attempt: a committed CommitOperationAdd cannot be reused, and after a lost
        # answer the files already there are skipped (unchanged hash) and nothing is left to delete
        lambda: api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(rel, job.folder / rel) for rel in files]
            + _stale(api, repo_id, candidate, files),
            commit_message=f"{commit_message} (candidate)",
            revision=candidate,
        ),
    )


def _verify_candidate(job: _Publish) -> None:
    """Step 3: the candidate branch must match the folder file for file before anything reaches main."""
    _verify(job, job.candidate, what=f"branch {job.candidate}")
    logger.info(
        "Verified branch %s: all %d files match the upload folder in size and hash.", job.candidate, len(job.files)
    )


def _verify(job: _Publish, revision: str, what: str) -> None:
    """PushError unless `revision` holds exactly the upload folder (sizes and hashes from the Hub's listing)."""
    job.stage = f"verifying {revision}"
    problems = remote_problems(job.api, job.repo_id, revision, job.folder, job.files)  # listing: retried by the library
    if problems:
        raise PushError(f"{what} does not match the upload folder: {'; '.join(problems[:10])}")


def _copy_ops(job: _Publish) -> list:
    """Onto main: server-side copies from the verified branch, main's stale files deleted."""
    copies = [CommitOperationCopy(rel, rel, src_revision=job.candidate) for rel in job.files]
    return copies + _stale(job.api, job.repo_id, "main", job.files)


def _open_pull_request(job: _Publish, commit_message: str) -> Published:
    """push.publish: pr: the candidate's files as one pull request on main (none when main already holds them)."""
    job.stage = "opening a pull request"
    # A lost answer here may leave a second, identical pull request: harmless, and visible.
    info = job.retry(
        job.stage,
        lambda: job.api.create_commit(
            job.repo_id, operations=_copy_ops(job), commit_message=commit_message, create_pr=True
        ),
    )
    # no pull request when main already holds exactly this content (nothing to commit)
    return Published(info.commit_url, info.oid, info.pr_revision or "main", info.pr_url)


def _publish_to_main(job: _Publish, commit_message: str) -> Published:
    """push.publish: main: one commit of the candidate's files whose parent is main's noted head (no overwrite)."""
    job.stage = "publishing to main"
    try:
        info = job.retry(
            job.stage,
            lambda: job.api.create_commit(
                job.repo_id,
                operations=_copy_ops(job),
                commit_message=commit_message,
                revision="main",
                parent_commit=job.base,
            ),
            already_done=lambda: _landed(job),
        )
    except HfHubHTTPError as err:
        if _status(err) != 412:  # 412: main's head is no longer `base`
            raise
        info = _landed(job)
        if info is None:
            raise
    return info if isinstance(info, Published) else Published(info.commit_url, info.oid, "main")


def _landed(job: _Publish) -> Published | None:
    """After a lost answer: did our commit reach main? main moved and matches the folder -> it did."""
    head = job.api.repo_info(job.repo_id, revision="main").sha
    if head == job.base:
        return None
    problems = remote_problems(job.api, job.repo_id, "main", job.folder, job.files)
    if problems:
        raise PushError(
            f"main moved while publishing (someone else pushed? main is now at {head[:8]}); this upload was "
            f"not published: {'; '.join(problems[:5])}"
        )
    return Published(f"{job.api.endpoint}/{job.repo_id}/commit/{head}", head, "main")


def _failed(job: _Publish, err: Exception) -> PushError:
    """The PushError for a failed publish: the stage it failed in, the cause with the token masked, main's state."""
    where = f" while {job.stage}" if job.stage else ""
    message = err.args[0] if isinstance(err, PushError) else _describe(err, job.token)
    return PushError(
        f"push to Hub repo '{job.push.repo_id}' failed{where}: {mask_secrets(message, job.token)}; "
        f"{_main_state(job.api, job.repo_id, job.base, job.token)}",
        status_code=_status(err),
    )


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
