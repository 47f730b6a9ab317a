"""Checks on the client before a run is submitted: what would otherwise fail later, in a step container or deep in
ZenML's code upload with a long traceback, fails here in seconds with one line that says what to fix.

check_artifact_store(): the active stack's artifact store is reachable and accepts its credentials. Called by
pipelines/lora_pipeline.py while the DAG compiles, so before the code upload and before any container starts.
A local artifact store is not checked (a folder on this machine).
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from core.logs import exception_chain, mask_secrets

# S3 error codes that mean "these credentials are not accepted" (wrong key id, wrong secret, no permission).
AUTH_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "Forbidden",
    "403",
}
MISSING_BUCKET_CODES = {"NoSuchBucket", "404"}


class ArtifactStoreError(RuntimeError):
    """The artifact store cannot be used as configured: unreachable, credentials refused, bucket or secret
    missing. The message names the store, its flavor, path and endpoint, and the secret (never its values)."""

    before_run = True  # core/logs.py's error hook: raised on the client while the run compiles, no step ran


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of the first botocore ClientError in the chain (s3fs wraps it in PermissionError/OSError)."""
    for e in exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return str(response["Error"].get("Code") or "")
    return None


def _describe(exc: BaseException) -> str:
    """The most telling message of the chain: botocore's (it carries the error code), else the outermost."""
    for e in exception_chain(exc):
        if getattr(e, "response", None) is not None:
            return f"{type(e).__name__}: {e}"
    return f"{type(exc).__name__}: {exc}"


def _credentials(store) -> list[str | None]:
    """The store's credentials, to mask in error messages ([] when it has none)."""
    try:
        return list(store.get_credentials())
    except Exception:  # no secret, no connector: nothing to redact
        return []


def check_artifact_store(store=None, timeout: float = 5.0) -> None:
    """Raise ArtifactStoreError unless the artifact store (default: the active stack's) lists its root path.

    With an explicit endpoint (client_kwargs.endpoint_url, an S3-compatible server) a TCP connect comes first:
    seconds instead of botocore's minute of retries when the server is down.
    """
    if store is None:
        from zenml.client import Client

        store = Client().active_stack.artifact_store
    if store.flavor == "local":
        return
    config = store.config
    secret = getattr(config, "authentication_secret", None)
    endpoint = (getattr(config, "client_kwargs", None) or {}).get("endpoint_url")
    where = f"artifact store '{store.name}' ({store.flavor}, {config.path}{f' at {endpoint}' if endpoint else ''})"
    if endpoint:
        _connect(endpoint, timeout, where, store.name)
    try:
        store.listdir(config.path)
    except KeyError as e:  # the authentication secret named by the store does not exist
        raise ArtifactStoreError(
            f"{where}: its authentication secret '{secret}' does not exist ({str(e).strip(chr(39))}); create it "
            f"(zenml secret create {secret} --aws_access_key_id=... --aws_secret_access_key=...) or point the store "
            f"at another (zenml artifact-store update {store.name} --authentication_secret=...)"
        ) from None
    except Exception as e:
        raise _listing_error(e, store, where, secret) from None
    finally:
        # the filesystem object is cached (fsspec): leave no listing behind for the run's own calls to trust
        fs = getattr(store, "_filesystem", None)
        if fs is not None and hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()


def _connect(endpoint: str, timeout: float, where: str, store_name: str) -> None:
    """A TCP connect to the store's endpoint: ArtifactStoreError in seconds when the server is down."""
    url = urlparse(endpoint)
    host, port = url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ArtifactStoreError(
            f"{where} is unreachable: cannot connect to {host}:{port} ({e.strerror or e}); check that the S3 "
            f"server is running (this project's local stack: bash infra/stacks/container.sh status) and the "
            f"store's endpoint_url (zenml artifact-store describe {store_name})"
        ) from None


def _listing_error(e: Exception, store, where: str, secret: str | None) -> ArtifactStoreError:
    """Why listing the root failed, in words: credentials refused, no bucket, unreachable, or else what happened."""
    credentials = f"the credentials of secret '{secret}'" if secret else "its credentials (no authentication secret)"
    fix_secret = (
        f"check the secret (zenml secret describe {secret}; zenml secret update {secret} "
        "--aws_access_key_id=... --aws_secret_access_key=...)"
        if secret
        else f"check the store's key/secret fields or this machine's cloud credentials (zenml artifact-store describe "
        f"{store.name})"
    )
    code = _error_code(e)
    text = mask_secrets(_describe(e), *_credentials(store))
    if code in AUTH_CODES or (code is None and any(isinstance(x, PermissionError) for x in exception_chain(e))):
        return ArtifactStoreError(f"{where} refused {credentials}: {text}; {fix_secret}")
    if code in MISSING_BUCKET_CODES or (code is None and isinstance(e, FileNotFoundError)):
        return ArtifactStoreError(
            f"{where}: the bucket does not exist ({text}); create it or fix the store's path "
            f"(zenml artifact-store update {store.name} --path=...)"
        )
    unreachable = any(isinstance(x, (ConnectionError, TimeoutError)) for x in exception_chain(e))
    if (code is None and unreachable) or "Could not connect" in text:
        return ArtifactStoreError(f"{where} is unreachable: {text}; check its endpoint and network")
    return ArtifactStoreError(f"{where} failed to list its root path: {text}; {fix_secret}")
