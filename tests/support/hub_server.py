"""A fake Hugging Face Hub on 127.0.0.1: the endpoints that steps/push.py's publishing calls.

What huggingface_hub 2.4.0 sends for `create_repo(exist_ok=True)` then `upload_folder(...)` / `create_commit(...)`:

    POST /api/repos/create                            {"name", "organization", "visibility"?, "type"?}
    POST /api/validate-yaml                           README.md front matter check, before hashing
    POST /api/{type}s/{ns}/{name}/preupload/{rev}     per file: path, size, 512-byte sample -> uploadMode
    POST /api/{type}s/{ns}/{name}/commit/{rev}        NDJSON: header line, then one line per file
                                                      (?create_pr=1: onto a new refs/pr/N instead of rev)
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]    repo info (only when a commit would be empty)

and for branches, listings and server-side copies (`create_branch`, `delete_branch`, `list_repo_tree`,
`get_paths_info`, `CommitOperationCopy`):

    POST   /api/{type}s/{ns}/{name}/branch/{branch}   {"startingPoint"?: branch or commit oid}
    DELETE /api/{type}s/{ns}/{name}/branch/{branch}
    GET    /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]   ?recursive=: files and folders, one page
    POST   /api/{type}s/{ns}/{name}/paths-info/{rev}  form: paths=...&expand=...
    GET    /[{type}s/]{ns}/{name}/resolve/{rev}/{path}    raw bytes (the client copies regular files this way)

Revisions and branch names arrive URL-quoted ("candidate%2Fabc"); the fake unquotes them.

The server answers preupload with uploadMode "regular" for every file, so every file's bytes
arrive base64-encoded in the commit NDJSON: the client never forces LFS (it only forces
"regular" for empty files), so no LFS batch API or xet storage is needed. The real Hub says
"lfs" for large and binary files; this fake trades that fidelity for having no storage backend.

Tests read what arrived from `files(repo_id)`, `repos`, `requests` (with lowercased headers),
and inject failures with `fail(path_contains, status, times, ...)`: an HTTP status, or DROP (the connection is
closed without an answer, as when a proxy or the network drops it); `after=True` fails the request only after
it took effect (a commit that landed but whose answer was lost).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "_create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "_validate_yaml"),
    ("POST", re.compile(rf"^/api/{_REPO}/preupload/(?P<rev>[^/]+)$"), "_preupload"),
    ("POST", re.compile(rf"^/api/{_REPO}/commit/(?P<rev>[^/]+)$"), "_commit"),
    ("GET", re.compile(rf"^/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "_repo_info"),
    ("POST", re.compile(rf"^/api/{_REPO}/branch/(?P<branch>[^/]+)$"), "_create_branch"),
    ("DELETE", re.compile(rf"^/api/{_REPO}/branch/(?P<branch>[^/]+)$"), "_delete_branch"),
    ("GET", re.compile(rf"^/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "_tree"),
    ("POST", re.compile(rf"^/api/{_REPO}/paths-info/(?P<rev>[^/]+)$"), "_paths_info"),
    # model repos have no type prefix in file URLs
    (
        "GET",
        re.compile(r"^/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        "_resolve",
    ),
]
DROP = 0  # a `fail` status: close the connection without answering


def git_blob_oid(data: bytes) -> str:
    """git's sha1 of a blob: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Recorded:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # keys lowercased
    body: bytes


@dataclass
class Failure:
    path_contains: str
    status: int  # HTTP status, or DROP
    times: int  # requests left to fail; the rule is spent at 0
    message: str | Callable[[Recorded], str]  # a callable sees the request (e.g. to echo a header)
    method: str | None = None  # only requests with this method; None: any
    after: bool = False  # handle the request first (it takes effect), then fail the answer


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})  # rev -> path -> bytes
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})  # rev -> commit oid
    commits: list[dict[str, Any]] = field(default_factory=list)  # oid, revision, summary, description, paths
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"0" * 40: {}})  # commit oid -> files


class _HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra


class FakeHub:
    """A threaded HTTP server speaking enough of the Hub API for create_repo + upload_folder."""

    def __init__(self, token: str | None = None):
        self.token = token  # when set, every request must carry `Authorization: Bearer <token>`
        self.repos: dict[str, Repo] = {}
        self.requests: list[Recorded] = []
        self.failures: list[Failure] = []
        self.unhandled: list[str] = []  # "METHOD /path" the fake has no route for
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        # poll_interval (s): how long stop() may wait for the serve loop to notice
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def fail(
        self,
        path_contains: str,
        status: int,
        times: int = 1,
        message: str | Callable[[Recorded], str] = "injected",
        method: str | None = None,
        after: bool = False,
    ) -> None:
        """Answer the next `times` requests whose path contains `path_contains` with `status` (or DROP them)."""
        with self.lock:
            self.failures.append(Failure(path_contains, status, times, message, method, after))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file at the head of `revision`: path -> bytes."""
        return dict(self.repos[repo_id].branches[revision])

    def calls(self) -> list[str]:
        """The requests so far as "METHOD /path", in order."""
        return [f"{r.method} {r.path}" for r in self.requests]

    # ------------------------------------------------------------------ request handling

    def handle(self, req: Recorded) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON payload or raw bytes); status DROP: close the connection without answering."""
        with self.lock:
            self.requests.append(req)
            rule = next(
                (
                    r
                    for r in self.failures
                    if r.times > 0 and r.path_contains in req.path and r.method in (None, req.method)
                ),
                None,
            )
            if rule is not None:
                rule.times -= 1
        if rule is None:
            return self._route(req)
        if rule.after:
            self._route(req)  # it takes effect; the client never hears so
        msg = rule.message(req) if callable(rule.message) else rule.message
        return rule.status, {}, {"error": msg}

    def _route(self, req: Recorded) -> tuple[int, dict[str, str], Any]:
        try:
            if self.token is not None and req.headers.get("authorization") != f"Bearer {self.token}":
                raise _HttpError(401, "Invalid credentials in Authorization header")
            for method, pattern, name in _ROUTES:
                match = pattern.match(req.path)
                if match and method == req.method:
                    with self.lock:  # one request at a time mutates repos
                        return 200, {}, getattr(self, name)(req, **match.groupdict())
            self.unhandled.append(f"{req.method} {req.path}")
            raise _HttpError(404, f"fake hub: no route for {req.method} {req.path}")
        except _HttpError as err:
            headers = {"X-Error-Code": err.error_code} if err.error_code else {}
            return err.status, headers, {"error": err.message, **err.extra}

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or repo.repo_type != repo_type:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _create_repo(self, req: Recorded) -> dict[str, Any]:
        payload = json.loads(req.body)
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        if repo_id in self.repos:
            # The real Hub answers 409 with the url, which `create_repo(exist_ok=True)` returns.
            raise _HttpError(409, f"You already created this {repo_type} repo", url=url)
        # No visibility: public, unless an org defaults to private (not modelled here).
        self.repos[repo_id] = Repo(repo_id, repo_type, private=payload.get("visibility") == "private")
        return {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _validate_yaml(self, req: Recorded) -> dict[str, Any]:
        content = json.loads(req.body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as err:
            raise _HttpError(400, f"Invalid YAML in README.md: {err}") from None
        warnings = [] if meta else [{"message": "Empty or missing yaml metadata in repo card"}]
        return {"errors": [], "warnings": warnings}

    def _branch_files(self, target: Repo, rev: str) -> dict[str, bytes]:
        if rev not in target.branches:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return target.branches[rev]

    @staticmethod
    def _entry(path: str, data: bytes) -> dict[str, Any]:
        # the Hub's tree / paths-info entry for a regular (non-LFS) file: its git blob oid and size
        return {"type": "file", "path": path, "oid": git_blob_oid(data), "size": len(data)}

    def _create_branch(self, req: Recorded, type: str, repo: str, branch: str) -> dict[str, Any]:
        target, branch = self._repo(type, repo), unquote(branch)
        if branch in target.branches:
            raise _HttpError(409, f"Reference {branch} already exists")
        start = (json.loads(req.body or b"{}") or {}).get("startingPoint") or "main"
        if start in target.branches:
            files, head = target.branches[start], target.heads[start]
        elif start in target.snapshots:  # a commit oid
            files, head = target.snapshots[start], start
        else:
            raise _HttpError(404, f"Invalid rev id: {start}", "RevisionNotFound")
        target.branches[branch], target.heads[branch] = dict(files), head
        return {}

    def _delete_branch(self, req: Recorded, type: str, repo: str, branch: str) -> dict[str, Any]:
        target, branch = self._repo(type, repo), unquote(branch)
        if branch == "main":
            raise _HttpError(403, "Cannot delete the default branch")
        self._branch_files(target, branch)
        del target.branches[branch], target.heads[branch]
        return {}

    def _tree(self, req: Recorded, type: str, repo: str, rev: str, path: str | None = None) -> list[dict[str, Any]]:
        files = self._branch_files(self._repo(type, repo), unquote(rev))
        recursive = parse_qs(req.query).get("recursive", ["False"])[0].lower() in ("1", "true")
        prefix = unquote(path).rstrip("/") + "/" if path else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            # the folders on the way (all of them when recursive, the first level otherwise)
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode())})
            if recursive or len(parts) == 1:
                entries[name] = self._entry(name, data)
        return list(entries.values())

    def _paths_info(self, req: Recorded, type: str, repo: str, rev: str) -> list[dict[str, Any]]:
        files = self._branch_files(self._repo(type, repo), unquote(rev))
        wanted = parse_qs(req.body.decode()).get("paths", [])
        return [self._entry(p, files[p]) for p in wanted if p in files]

    def _resolve(self, req: Recorded, type: str | None, repo: str, rev: str, path: str) -> bytes:
        files = self._branch_files(self._repo(type or "model", repo), unquote(rev))
        path = unquote(path)
        if path not in files:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        return files[path]

    def _preupload(self, req: Recorded, type: str, repo: str, rev: str) -> dict[str, Any]:
        files = self._repo(type, repo).branches.get(unquote(rev), {})
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    # the client skips files whose oid is unchanged
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                }
                for f in json.loads(req.body)["files"]
            ]
        }

    def _commit(self, req: Recorded, type: str, repo: str, rev: str) -> dict[str, Any]:
        target = self._repo(type, repo)
        rev = unquote(rev)
        base = rev
        if parse_qs(req.query).get("create_pr") == ["1"]:  # a new refs/pr/N from rev takes the commit
            pr_num = 1 + sum(1 for b in target.branches if b.startswith("refs/pr/"))
            rev = f"refs/pr/{pr_num}"
            target.branches[rev], target.heads[rev] = dict(self._branch_files(target, base)), target.heads[base]
        files = dict(target.branches.get(rev, {}))
        header: dict[str, Any] = {}
        paths: list[str] = []
        for line in req.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HttpError(404, f"cannot delete {value['path']}: no such file")
                files.pop(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:  # lfsFile: this fake never asks for LFS, so the client should never send one
                raise _HttpError(400, f"fake hub: unsupported commit operation {key!r}")
        parent = target.heads.get(rev, "0" * 40)
        if header.get("parentCommit") not in (None, target.heads.get(base, parent)):
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        digest = hashlib.sha1(parent.encode() + json.dumps(header, sort_keys=True).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_oid(files[path]).encode())
        oid = digest.hexdigest()
        target.branches[rev] = files
        target.heads[rev] = oid
        target.snapshots[oid] = dict(files)
        target.commits.append(
            {
                "oid": oid,
                "revision": rev,
                "summary": header.get("summary"),
                "description": header.get("description"),
                "paths": paths,
            }
        )
        prefix = "" if type == "model" else f"{type}s/"
        pr_url = f"{self.endpoint}/{prefix}{repo}/discussions/{rev.split('/')[-1]}" if rev != base else None
        return {"commitUrl": f"{self.endpoint}/{prefix}{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}

    def _repo_info(self, req: Recorded, type: str, repo: str, rev: str | None = None) -> dict[str, Any]:
        target = self._repo(type, repo)
        rev = unquote(rev) if rev else "main"
        if rev not in target.branches:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return {
            "id": repo,
            "sha": target.heads[rev],
            "private": target.private,
            "siblings": [{"rfilename": p} for p in sorted(target.branches[rev])],
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer has a Content-Length

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        url = urlsplit(self.path)
        req = Recorded(
            method=self.command,
            path=url.path,
            query=url.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        status, headers, payload = self.server.hub.handle(req)  # type: ignore[attr-defined]
        if status == DROP:
            self.close_connection = True  # the client sees the connection close with no response
            return
        raw = isinstance(payload, bytes)
        body = payload if raw else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: tests capture stderr to check for secrets and want no noise
