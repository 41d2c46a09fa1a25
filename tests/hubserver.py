"""An in-memory, Hub-compatible HTTP server for tests of publishing to and downloading from the Hugging Face Hub.

The real huggingface_hub client talks to it (through ``HF_ENDPOINT``), so tests exercise the requests the client
actually makes instead of a mock of its Python API: repo and branch creation, revision info, the preupload and
LFS batch/upload steps of a commit, the NDJSON commit itself, paginated tree listings and the ``resolve`` downloads.
Only the standard library is used, so the fixture costs nothing to install and starts in milliseconds.

The client reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported, so it has to run in a subprocess
started with :func:`client_env` (or :func:`run_client`)::

    with HubServer() as hub:
        hub.create_repo("tester/source", card_data={"license": "openrail++"})
        hub.commit("tester/source", {"model_index.json": b"{}", "unet/model.safetensors": weights})
        result = run_client(hub, tmp_path, "from huggingface_hub import snapshot_download; ...")

What it does not do: Xet storage (clients must set ``HF_HUB_DISABLE_XET=1``, which :func:`client_env` does),
pull requests, dataset and Space repos, multipart LFS uploads (never offered), access control beyond "a token
is required to write and to read a private repo" (any token is accepted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

USER = "tester"
"""The account every token belongs to; repos created without an organization land in this namespace."""

LFS_SUFFIXES = (".safetensors", ".pt2", ".so", ".bin")
"""Files stored with LFS whatever their size, as the Hub's default ``.gitattributes`` does for weights."""

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
"""Files larger than this go to LFS: the Hub refuses regular (git) files above 10 MiB."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
_WRITE_ACTIONS = frozenset({"preupload", "commit", "branch", "tag"})


def _now() -> str:
    """The Hub's timestamp format, the only one the client's ``parse_datetime`` is guaranteed to read."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_sha1(content: bytes) -> str:
    """The object id git gives a blob; the Hub uses it as the ETag and ``oid`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Blob:
    """The content of one file in a commit, and whether the repo stores it with LFS (which changes its metadata)."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The LFS pointer git would store instead of the content; its git id is the file's ``oid`` in listings."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def git_oid(self) -> str:
        return _git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What ``resolve`` answers as ETag: the sha256 for LFS files, the git blob id otherwise (as the Hub does)."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo: the full file tree (not a diff), so any revision is served directly."""

    sha: str
    parent: str | None
    files: Mapping[str, Blob]
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    card_data: dict[str, Any] | None
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _HubError(Exception):
    """An error answered the way the Hub does: the client picks its exception class from ``X-Error-Code``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> _Response:
        headers = {"X-Error-Message": self.message.encode("ascii", "replace").decode(), **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _json(self.status, {"error": self.message, **self.extra}, headers)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    """Query booleans: the client sends Python booleans, which httpx writes as ``true``/``false``."""
    return (query.get(name) or ["false"])[-1].lower() in ("1", "true", "yes")


def _folders(files: Iterable[str]) -> set[str]:
    return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}


def _folder_digest(files: Mapping[str, Blob], folder: str) -> str | None:
    """A git-tree-like id of a folder: it changes exactly when something under the folder changes."""
    prefix = folder + "/" if folder else ""
    entries = sorted((path, blob.git_oid) for path, blob in files.items() if path.startswith(prefix))
    if not entries:
        return None
    return hashlib.sha1("".join(f"{path}\0{oid}\n" for path, oid in entries).encode()).hexdigest()


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def front_matter(text: str) -> dict[str, Any] | None:
    """The metadata block of a model card, as the Hub turns it into ``cardData``.

    Only the flat subset model cards use in practice is understood (``key: value``, ``key: [a, b]`` and ``key:``
    followed by ``- item`` lines); nested mappings are left out rather than guessed, since there is no YAML parser
    in the standard library.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return None
    data: dict[str, Any] = {}
    pending: str | None = None  # a `key:` with no value yet: a list or a nested mapping follows
    for line in lines[1:end]:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t-":
            if pending is None:
                continue
            if stripped.startswith("- ") or stripped == "-":
                items = data.setdefault(pending, [])
                if isinstance(items, list):
                    items.append(_scalar(stripped[1:]))
            else:  # a nested mapping: not understood, left out
                data[pending] = "<nested>"
            continue
        name, sep, value = line.partition(":")
        if not sep:
            pending = None
            continue
        pending = None
        key, value = name.strip(), value.strip()
        if not value:
            pending = key
        elif value.startswith("[") and value.endswith("]"):
            data[key] = [_scalar(item) for item in value[1:-1].split(",") if item.strip()]
        else:
            data[key] = _scalar(value)
    return {key: value for key, value in data.items() if value != "<nested>"}


def _byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks for; the client sends one when it resumes a download."""
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last or int(last) == 0:
            raise _HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
        return max(total - int(last), 0), total - 1
    start = int(first)
    stop = min(int(last), total - 1) if last else total - 1
    if start >= total or start > stop:
        raise _HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
    return start, stop


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer):
        super().__init__(address, _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into calls of :meth:`HubServer._handle`; keep-alive, as the client pools connections."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the requests are in `hub.requests`; the test output stays readable

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        """The whole request body, read before answering so an early error never desynchronises the connection."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub._record(method, unquote(url.path))
        try:
            body = self._read_body()
            response = hub._handle(method, url.path, parse_qs(url.query), self.headers, body)
        except _HubError as error:
            response = error.response()
        except Exception:
            hub._record_error(traceback.format_exc())
            response = _HubError(500, "internal error of the test Hub server (see hub.errors)").response()
            self.close_connection = True
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in response.headers:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)


class HubServer:
    """An in-memory Hugging Face Hub on an ephemeral local port, for the real huggingface_hub client.

    Storage: repos -> branches (and tags) -> commits, each commit an immutable snapshot of path -> bytes. LFS
    objects are kept by sha256, shared by all repos, as the Hub deduplicates them.

    Settable knobs:

    - ``page_size``: entries per page of tree and commit listings (the client follows ``Link: rel="next"``);
      set it small to make tests go through pagination.
    - ``fail_lfs_uploads_after``: once this many LFS objects have been stored, every further upload attempt is
      answered ``lfs_failure_status`` and stores nothing (``None``: never fail). Further attempts fail too because
      the client retries failed uploads: a single failure would go unnoticed.
    - ``lfs_failure_status``: 500 by default, which the client retries five times; the response carries
      ``Retry-After: 0``, so that costs about 5 s. A 4xx (e.g. 403) fails at once.
    - ``lfs_suffixes`` and ``lfs_threshold``: which files the preupload step sends to LFS.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.page_size = 50
        self.fail_lfs_uploads_after: int | None = None
        self.lfs_failure_status = 500
        self.lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES
        self.lfs_threshold = LFS_SIZE_THRESHOLD
        self._address = (host, port)
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._objects: dict[str, bytes] = {}
        self._requests: list[tuple[str, str]] = []
        self._errors: list[str] = []
        self._counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the value of ``HF_ENDPOINT`` for the client."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- setup and inspection by tests ------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, card_data: dict[str, Any] | None = None, private: bool = False) -> str:
        """Creates a model repo with an empty initial commit on ``main``; returns that commit's sha.

        ``card_data`` is what ``model_info`` answers as ``cardData`` while the repo has no README.md with metadata:
        a stand-in for a source model's card (its license, for instance) without writing one.
        """
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id} already exists")
            repo = _Repo(repo_id, private, dict(card_data) if card_data is not None else None, _now())
            initial = self._new_commit(repo, None, {}, "initial commit", "")
            repo.branches["main"] = initial.sha
            self._repos[repo_id] = repo
            return initial.sha

    def commit(
        self,
        repo_id: str,
        add: Mapping[str, bytes] | None = None,
        delete: Iterable[str] = (),
        branch: str = "main",
        message: str = "Update files",
    ) -> str:
        """Commits directly, without the client: seeds a repo that tests then download from. Returns the new sha.

        Files go to LFS by the same rule as the preupload step; a path in ``delete`` ending with ``/`` is a folder.
        """
        ops: list[tuple[str, str, Blob | None]] = [("delete", path, None) for path in delete]
        ops += [("add", path, Blob(bytes(data), self._is_lfs(path, len(data)))) for path, data in (add or {}).items()]
        with self._lock:
            return self._apply_commit(self._repo(repo_id), branch, message, "", ops, None).sha

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        """Creates ``branch`` at ``revision``; returns the sha it points to."""
        with self._lock:
            repo = self._repo(repo_id)
            sha = self._resolve(repo, revision).sha
            repo.branches[branch] = sha
            return sha

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._repo(repo_id).branches[branch]

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        """The shas of the branch's history, newest first (the initial commit last)."""
        with self._lock:
            repo = self._repo(repo_id)
            return [commit.sha for commit in self._history(repo, repo.commits[repo.branches[branch]])]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a revision (branch, tag or sha): path -> content."""
        with self._lock:
            return {path: blob.data for path, blob in self._resolve(self._repo(repo_id), revision).files.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        """The paths of a revision stored with LFS, to check which files a publisher sent through LFS."""
        with self._lock:
            return {path for path, blob in self._resolve(self._repo(repo_id), revision).files.items() if blob.lfs}

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    @property
    def lfs_objects(self) -> dict[str, bytes]:
        """Every LFS object uploaded so far, by sha256, committed or not."""
        with self._lock:
            return dict(self._objects)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of the (method, path) of every request received, in order; the path is unquoted, without query."""
        with self._lock:
            return list(self._requests)

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def errors(self) -> list[str]:
        """Tracebacks of exceptions raised while handling requests (answered 500): a bug of this server, not the client's."""
        with self._lock:
            return list(self._errors)

    # -- storage ------------------------------------------------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _record_error(self, error: str) -> None:
        with self._lock:
            self._errors.append(error)

    def _is_lfs(self, path: str, size: int) -> bool:
        return path.endswith(self.lfs_suffixes) or size > self.lfs_threshold

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> Commit:
        sha = repo.branches.get(revision) or repo.tags.get(revision)
        if sha is None and _COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            sha = revision
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _history(self, repo: _Repo, commit: Commit) -> list[Commit]:
        history = [commit]
        while history[-1].parent is not None:
            history.append(repo.commits[history[-1].parent])
        return history

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: Mapping[str, Blob], title: str, message: str
    ) -> Commit:
        """Stores a commit; its sha covers the repo, parent, tree and a counter, so no two commits share one."""
        self._counter += 1
        tree = _folder_digest(files, "") or ""
        seed = f"{repo.repo_id}\n{parent}\n{self._counter}\n{tree}\n{title}\n{message}"
        commit = Commit(
            hashlib.sha1(seed.encode()).hexdigest(), parent, MappingProxyType(dict(files)), title, message, _now()
        )
        repo.commits[commit.sha] = commit
        return commit

    def _apply_commit(
        self,
        repo: _Repo,
        branch: str,
        title: str,
        message: str,
        ops: list[tuple[str, str, Blob | None]],
        parent: str | None,
    ) -> Commit:
        """Builds the new tree from the branch head, then moves the branch: all or nothing, under the lock."""
        head = repo.branches.get(branch)
        if head is None:
            if branch in repo.tags or branch in repo.commits:
                raise _HubError(400, f"Can only commit to a branch, not to {branch}")
            raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if parent is not None and not head.startswith(parent.lower()):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for kind, path, blob in ops:
            if kind == "add":
                assert blob is not None
                files[path] = blob
            elif path.endswith("/") or kind == "delete_folder":
                prefix = path.rstrip("/") + "/"
                doomed = [name for name in files if name.startswith(prefix)]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in doomed:
                    del files[name]
            elif files.pop(path, None) is None:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        commit = self._new_commit(repo, head, files, title, message)
        repo.branches[branch] = commit.sha
        return commit

    # -- HTTP routing -------------------------------------------------------------------------------------------------

    def _handle(
        self, method: str, raw_path: str, query: dict[str, list[str]], headers: Message, body: bytes
    ) -> _Response:
        """Routes a request. Path segments are split before unquoting: revisions arrive quoted with ``safe=''``."""
        segments = [unquote(segment) for segment in raw_path.split("/")[1:]]
        authorized = bool(headers.get("Authorization"))
        with self._lock:
            if segments[:1] == ["api"]:
                return self._api(method, segments[1:], query, body, authorized)
            if segments[:1] == ["_lfs"] and len(segments) == 2 and method == "PUT":
                return self._lfs_upload(segments[1], query, body)
            if len(segments) == 6 and segments[1].endswith(".git") and segments[2:5] == ["info", "lfs", "objects"]:
                repo = self._repo(f"{segments[0]}/{segments[1][:-4]}")
                if not authorized:
                    raise _HubError(401, "Invalid credentials in Authorization header")
                if segments[5] == "batch" and method == "POST":
                    return self._lfs_batch(repo, json.loads(body))
                if segments[5] == "verify" and method == "POST":
                    return self._lfs_verify(json.loads(body))
            if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
                repo = self._readable(f"{segments[0]}/{segments[1]}", authorized)
                return self._resolve_file(repo, segments[3], "/".join(segments[4:]), headers.get("Range"))
        raise _HubError(404, f"Not found: {method} {raw_path}")

    def _readable(self, repo_id: str, authorized: bool) -> _Repo:
        """A private repo is invisible without a token; the Hub answers 401 with the RepoNotFound code."""
        repo = self._repo(repo_id)
        if repo.private and not authorized:
            raise _HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _api(
        self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes, authorized: bool
    ) -> _Response:
        route = (method, "/".join(segments))
        if route == ("GET", "whoami-v2"):
            if not authorized:
                raise _HubError(401, "Invalid credentials in Authorization header")
            return _json(200, self._whoami())
        if route == ("POST", "validate-yaml"):
            return _json(200, {"errors": [], "warnings": []})
        if route in (("POST", "repos/create"), ("DELETE", "repos/delete")):
            if not authorized:
                raise _HubError(401, "Invalid credentials in Authorization header")
            payload = json.loads(body or b"{}")
            if payload.get("type", "model") != "model":
                raise _HubError(400, "This test server only serves model repos")
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            if method == "DELETE":
                self._repo(repo_id)
                del self._repos[repo_id]
                return _Response(200)
            return self._create_repo(repo_id, payload)
        if len(segments) < 3 or segments[0] not in ("models", "datasets", "spaces", "kernels"):
            raise _HubError(404, f"Not found: {method} /api/{route[1]}")
        repo_id = f"{segments[1]}/{segments[2]}"
        if segments[0] != "models":
            raise _HubError(404, f"Repository not found: {repo_id} (only model repos are served)", "RepoNotFound")
        action, rest = (segments[3], segments[4:]) if len(segments) > 3 else (None, [])
        if action in _WRITE_ACTIONS and method != "GET" and not authorized:
            raise _HubError(401, "Invalid credentials in Authorization header")
        repo = self._readable(repo_id, authorized)
        if action is None and method == "GET":
            return self._info(repo, self._resolve(repo, "main"), _flag(query, "blobs"))
        if action == "revision" and method == "GET" and len(rest) == 1:
            return self._info(repo, self._resolve(repo, rest[0]), _flag(query, "blobs"))
        if action == "preupload" and method == "POST" and len(rest) == 1:
            return self._preupload(repo, rest[0], json.loads(body))
        if action == "commit" and method == "POST" and len(rest) == 1:
            return self._commit(repo, rest[0], query, body)
        if action == "tree" and method == "GET" and rest:
            return self._tree(repo, rest[0], "/".join(rest[1:]).strip("/"), query)
        if action == "paths-info" and method == "POST" and len(rest) == 1:
            return self._paths_info(repo, rest[0], parse_qs(body.decode()))
        if action == "commits" and method == "GET" and len(rest) == 1:
            return self._commit_log(repo, rest[0], query)
        if action == "refs" and method == "GET" and not rest:
            return _json(200, self._refs(repo))
        if action == "branch" and len(rest) == 1 and method in ("POST", "DELETE"):
            return self._branch(repo, rest[0], method, json.loads(body or b"{}"))
        if action == "tag" and len(rest) == 1 and method in ("POST", "DELETE"):
            return self._tag(repo, rest[0], method, json.loads(body or b"{}"))
        raise _HubError(404, f"Not found: {method} /api/{route[1]}")

    # -- endpoints ----------------------------------------------------------------------------------------------------

    def _whoami(self) -> dict[str, Any]:
        return {
            "type": "user",
            "id": "0" * 24,
            "name": USER,
            "fullname": "Tester",
            "email": f"{USER}@example.com",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
        }

    def _create_repo(self, repo_id: str, payload: dict[str, Any]) -> _Response:
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            # The client reads `url` from this 409 too when it was called with exist_ok=True.
            raise _HubError(409, "You already created this model repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private)
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _card_data(self, repo: _Repo, commit: Commit) -> dict[str, Any] | None:
        readme = commit.files.get("README.md")
        if readme is not None:
            card = front_matter(readme.data.decode("utf-8", "replace"))
            if card:
                return card
        return repo.card_data

    def _info(self, repo: _Repo, commit: Commit, blobs: bool) -> _Response:
        siblings = []
        for path in sorted(commit.files):
            blob = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        card = self._card_data(repo, commit)
        tags = card.get("tags") if card else None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(tags) if isinstance(tags, list) else [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(len(blob.data) for blob in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if key in card:
                    info[key] = card[key]
        return _json(200, info)

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> _Response:
        """Upload modes, plus the oid of the file already there so the client can skip unchanged files."""
        commit = self._resolve(repo, revision)
        answers = []
        for entry in payload.get("files", []):
            path, size = entry["path"], int(entry["size"])
            existing = commit.files.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            mode = "lfs" if self._is_lfs(path, size) else "regular"
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json(200, {"files": answers, "commitOid": commit.sha})

    def _lfs_batch(self, repo: _Repo, payload: dict[str, Any]) -> _Response:
        """The git-lfs batch API, basic transfer only: an upload action per object not stored yet."""
        if payload.get("operation") != "upload":
            raise _HubError(400, "This test server only accepts LFS uploads")
        objects = []
        for entry in payload.get("objects", []):
            oid, size = str(entry["oid"]), int(entry["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if not _SHA256.fullmatch(oid):
                answer["error"] = {"code": 422, "message": f"Invalid oid {oid}"}
            elif oid not in self._objects:
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/{oid}?{urlencode({'size': size})}"},
                    "verify": {"href": f"{self.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        return _json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, oid: str, query: dict[str, list[str]], body: bytes) -> _Response:
        """The pre-signed storage URL of the batch answer: no token, content checked against oid and size."""
        if self.fail_lfs_uploads_after is not None and len(self._objects) >= self.fail_lfs_uploads_after:
            raise _HubError(self.lfs_failure_status, "Injected LFS upload failure", headers={"Retry-After": "0"})
        size = int((query.get("size") or [len(body)])[0])
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self._objects[oid] = body
        return _Response(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, payload: dict[str, Any]) -> _Response:
        stored = self._objects.get(str(payload.get("oid")))
        if stored is None or len(stored) != payload.get("size"):
            raise _HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        return _json(200, {})

    def _commit(self, repo: _Repo, branch: str, query: dict[str, list[str]], body: bytes) -> _Response:
        """The NDJSON commit: a header line, then one line per file added (inline or LFS) or deleted."""
        if _flag(query, "create_pr"):
            raise _HubError(400, "This test server does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        ops: list[tuple[str, str, Blob | None]] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", ""))
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise _HubError(400, f"Invalid path {path!r}")
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                ops.append(("add", path, Blob(data, lfs=False)))
            elif key == "lfsFile":
                data = self._objects.get(str(value.get("oid")))
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}",
                    )
                ops.append(("add", path, Blob(data, lfs=True)))
            elif key == "deletedFile":
                ops.append(("delete_file", path, None))
            elif key == "deletedFolder":
                ops.append(("delete_folder", path, None))
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        commit = self._apply_commit(
            repo, branch, header.get("summary", ""), header.get("description", ""), ops, header.get("parentCommit")
        )
        return _json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}",
                "pullRequestUrl": None,
                "hookOutput": "",
            },
        )

    def _entry(self, repo: _Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        """One tree entry, shaped as the client's RepoFile / RepoFolder read it."""
        blob = commit.files.get(path)
        entry: dict[str, Any]
        if blob is not None:
            entry = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        else:
            entry = {"type": "directory", "oid": _folder_digest(commit.files, path), "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, commit, path, blob is None)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
            if blob is not None:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return entry

    def _last_commit(self, repo: _Repo, commit: Commit, path: str, folder: bool) -> Commit:
        """The oldest commit since which ``path`` is unchanged: the one that last touched it."""

        def state(snapshot: Commit) -> object:
            return _folder_digest(snapshot.files, path) if folder else snapshot.files.get(path)

        current, value = commit, state(commit)
        while current.parent is not None and state(repo.commits[current.parent]) == value:
            current = repo.commits[current.parent]
        return current

    def _page(self, items: list[Any], path: str, query: dict[str, list[str]]) -> _Response:
        """One page of a listing, with the next page's URL in a ``Link`` header, as the Hub paginates.

        ``path`` is the listing's quoted path; the cursor is an offset, opaque to the client as the Hub's is.
        """
        start = int((query.get("cursor") or ["0"])[0])
        stop = start + max(int(self.page_size), 1)
        headers = {}
        if stop < len(items):
            params = {key: values[-1] for key, values in query.items() if key != "cursor"}
            params["cursor"] = str(stop)
            headers["Link"] = f'<{self.endpoint}{path}?{urlencode(params)}>; rel="next"'
        return _json(200, items[start:stop], headers)

    def _tree(self, repo: _Repo, revision: str, base: str, query: dict[str, list[str]]) -> _Response:
        commit = self._resolve(repo, revision)
        folders = _folders(commit.files)
        if base and base not in folders:
            raise _HubError(404, f"Folder not found: {base}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        prefix = base + "/" if base else ""
        recursive, expand = _flag(query, "recursive"), _flag(query, "expand")
        paths = sorted(
            path
            for path in (*commit.files, *folders)
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
        )
        entries = [self._entry(repo, commit, path, expand) for path in paths]
        tail = "/" + quote(base, safe="") if base else ""
        return self._page(entries, f"/api/models/{repo.repo_id}/tree/{quote(revision, safe='')}{tail}", query)

    def _paths_info(self, repo: _Repo, revision: str, form: dict[str, list[str]]) -> _Response:
        commit = self._resolve(repo, revision)
        known = set(commit.files) | _folders(commit.files)
        expand = _flag(form, "expand")
        paths = [path.strip("/") for path in form.get("paths", [])]
        return _json(200, [self._entry(repo, commit, path, expand) for path in paths if path in known])

    def _commit_log(self, repo: _Repo, revision: str, query: dict[str, list[str]]) -> _Response:
        items = [
            {
                "id": commit.sha,
                "title": commit.title,
                "message": commit.message,
                "authors": [{"user": USER}],
                "date": commit.date,
            }
            for commit in self._history(repo, self._resolve(repo, revision))
        ]
        return self._page(items, f"/api/models/{repo.repo_id}/commits/{quote(revision, safe='')}", query)

    def _refs(self, repo: _Repo) -> dict[str, Any]:
        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha} for name, sha in names.items()]

        return {
            "branches": refs(repo.branches, "heads"),
            "converts": [],
            "tags": refs(repo.tags, "tags"),
            "pullRequests": [],
        }

    def _branch(self, repo: _Repo, branch: str, method: str, payload: dict[str, Any]) -> _Response:
        if method == "DELETE":
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise _HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _Response(200)
        if branch in repo.branches or branch in repo.tags:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._resolve(repo, payload.get("startingPoint") or "main").sha
        return _Response(200)

    def _tag(self, repo: _Repo, name: str, method: str, payload: dict[str, Any]) -> _Response:
        if method == "DELETE":
            if repo.tags.pop(name, None) is None:
                raise _HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            return _Response(200)
        tag = str(payload.get("tag", ""))
        if tag in repo.tags or tag in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = self._resolve(repo, name).sha
        return _Response(200)

    def _resolve_file(self, repo: _Repo, revision: str, path: str, range_header: str | None) -> _Response:
        """A file download. The bytes are served directly rather than by a redirect to a CDN, which the client
        accepts (it follows same-host redirects and reads the metadata from the final answer anyway)."""
        commit = self._resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client remember the absence of the file for that commit.
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if blob.lfs:
            headers["X-Linked-Size"] = str(len(blob.data))
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
        byte_range = _byte_range(range_header, len(blob.data))
        if byte_range is None:
            return _Response(200, blob.data, headers)
        start, stop = byte_range
        headers["Content-Range"] = f"bytes {start}-{stop}/{len(blob.data)}"
        return _Response(206, blob.data[start : stop + 1], headers)


def client_env(hub: HubServer, home: Path) -> dict[str, str]:
    """The environment of a subprocess running the huggingface_hub client against ``hub``.

    The caller's own Hub settings (``HF_*``, including the ``HF_HUB_OFFLINE=1`` of the test session and any real
    token) are dropped, so tests neither reach huggingface.co nor depend on the machine; the cache goes under
    ``home``. Xet is disabled because this server speaks only the LFS protocol.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGING_FACE_")) and key != "TRANSFORMERS_OFFLINE"
    }
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost"]))
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="0",
        HF_TOKEN="x",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
    )
    return env


def run_client(
    hub: HubServer, home: Path, script: str, *, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` with this interpreter in the environment of :func:`client_env`, plus ``env``.

    Raises AssertionError with the script's output if it fails, so a test failure shows the client's traceback.
    """
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**client_env(hub, home), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        server_errors = "\n".join(hub.errors)
        raise AssertionError(
            f"client script failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{server_errors}"
        )
    return result
