"""A fake Hugging Face Hub on 127.0.0.1, so the publish tests run the REAL huggingface_hub client.

`FakeHub` is a stdlib HTTP server in a thread (port 0, loopback only) that answers just the
requests huggingface_hub 2.4.0 makes for what apex_orch/release/publish.py does:

  POST /api/repos/create                            create_repo (409 when it exists: exist_ok)
  POST /api/models/<repo>/paths-info/<rev>          get_paths_info (form data)
  POST /api/models/<repo>/preupload/<rev>           upload mode per file: "lfs" or "regular"
  POST /api/validate-yaml                           create_commit checks README.md's front matter
  POST /<repo>.git/info/lfs/objects/batch           the LFS batch API, answered with "basic" transfer
  PUT  /lfs-objects/<sha256>                        the LFS object itself (one PUT, no token)
  POST /<repo>.git/info/lfs/objects/verify          the LFS verify action
  POST /api/models/<repo>/commit/<rev>              the NDJSON commit
  HEAD, GET /datasets/<repo>/resolve/<rev>/<file>   hf_hub_download of a dataset file (`add_file` puts it there)
  HEAD, GET /<repo>/resolve/<rev>/<file>            hf_hub_download of a model file (a release baseline)
  GET  /api/datasets/<repo>/revision/<rev>          HfApi.dataset_info (the commit a revision names)

It keeps each repo's files (path -> bytes, and the sha256 of those stored through LFS) so a test
asserts on what actually arrived, records every request (method, path, what it was, its
Authorization header and its decoded body), and can be told to fail one kind of request, e.g. a
401 whose body echoes the Authorization header it received. Anything else is answered 404 and
recorded as "unexpected", so a test sees it.

Why tests must turn Xet off (the `hub` fixtures set huggingface_hub.constants.HF_HUB_DISABLE_XET):
in 2.4.0 the client picks the upload route by itself, not from the Hub's answers.
_commit_api._upload_files uploads through Xet whenever `is_xet_available()` (hf_xet installed and
HF_HUB_DISABLE_XET unset) and the data is a path or bytes; only then does it fall back to the LFS
batch API. No answer from this server can steer it, and the Xet storage protocol (hf_xet's CAS
client) is not something a test can fake here. A request for a Xet token is answered 501 and
recorded as "xet", so a test that forgot to turn Xet off fails loudly instead of hanging.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

# Paths the Hub's default .gitattributes stores through LFS (the part that matters here).
LFS_SUFFIXES = (".gguf", ".bin", ".safetensors")
LFS_MIN_SIZE = 10 << 20


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    op: str                          # create_repo, paths_info, preupload, validate_yaml, lfs_batch,
    authorization: str | None        # lfs_upload, lfs_verify, commit, xet, unexpected
    body: Any = None                 # JSON/form body decoded; the NDJSON commit as a list of lines


@dataclass
class StoredFile:
    data: bytes
    lfs_sha256: str | None           # set when the file came through LFS (an lfsFile commit line)


@dataclass
class Commit:
    oid: str
    revision: str
    summary: str
    description: str
    paths: list[str]


@dataclass
class Repo:
    repo_id: str
    visibility: str | None
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)


def git_blob_oid(data: bytes) -> str:
    """The Hub's oid of a regular file: git's blob sha1 (computed here, not by the client library)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class FakeHub:
    """The fake Hub's state; `start()` serves it on 127.0.0.1 until `stop()`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}      # sha256 -> bytes PUT (not yet or already committed)
        self.requests: list[HubRequest] = []
        self.failures: dict[str, tuple[int, str]] = {}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._answers = {"resolve": self._resolve, "dataset_info": self._dataset_info,
                         "create_repo": self._create_repo, "paths_info": self._paths_info,
                         "preupload": self._preupload, "validate_yaml": self._validate_yaml,
                         "lfs_batch": self._lfs_batch, "lfs_upload": self._lfs_upload,
                         "lfs_verify": self._lfs_verify, "commit": self._commit, "xet": self._xet,
                         "unexpected": self._unexpected}

    # ------------------------------------------------------------------ control

    def start(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake Hub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, op: str, status: int, message: str) -> None:
        """Answer every `op` request with `status` and {"error": message}; "{authorization}" in
        the message is replaced by the Authorization header the request carried."""
        self.failures[op] = (status, message)

    def add_file(self, repo_id: str, path: str, data: bytes) -> str:
        """Commit `data` as `path` in `repo_id` (created when new), as a download test's fixture;
        returns the commit oid (what a pinned revision names)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, None))
            repo.files[path] = StoredFile(data, hashlib.sha256(data).hexdigest())
            commit = Commit(self._new_oid(repo), "main", f"add {path}", "", [path])
            repo.commits.append(commit)
            return commit.oid

    def ops(self) -> list[str]:
        return [r.op for r in self.requests]

    def stored(self, repo_id: str) -> dict[str, bytes]:
        return {p: f.data for p, f in self.repos[repo_id].files.items()}

    # ------------------------------------------------------------------ the Hub's side

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict, Any]:
        """(status, extra headers, JSON answer) for one request; records it first."""
        route = urlsplit(path).path
        op, match = _route(method, route)
        body = _decode_body(op, headers, raw)
        auth = headers.get("authorization")
        with self.lock:
            self.requests.append(HubRequest(method, route, op, auth, body))
            if op in self.failures:
                status, message = self.failures[op]
                return status, {}, {"error": message.replace("{authorization}", str(auth))}
            return self._answers[op](match, body, raw)

    def _repo(self, repo_id: str) -> Repo | None:
        return self.repos.get(repo_id)

    def _unexpected(self, match, body, raw):
        return 404, {}, {"error": "the fake Hub does not serve this request"}

    def _xet(self, match, body, raw):
        return 501, {}, {"error": "the fake Hub speaks the LFS basic transfer only: set HF_HUB_DISABLE_XET"}

    def _create_repo(self, match, body, raw):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            return 409, {}, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        repo = Repo(repo_id, body.get("visibility"))
        gitattributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
        repo.files[".gitattributes"] = StoredFile(gitattributes, None)
        repo.commits.append(Commit(self._new_oid(repo), "main", "initial commit", "", [".gitattributes"]))
        self.repos[repo_id] = repo
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _revision_error(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if revision not in {c.revision for c in repo.commits} | {c.oid for c in repo.commits}:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        return None

    def _resolve(self, match, body, raw):
        """A file download: headers for HEAD, the bytes (not JSON) for GET."""
        repo_id, revision, path = match.group(1), unquote(match.group(2)), unquote(match.group(3))
        if (err := self._revision_error(repo_id, revision)) is not None:
            return err
        repo = self.repos[repo_id]
        held = repo.files.get(path)
        if held is None:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{path} does not exist"}
        commit = next((c.oid for c in repo.commits if revision in (c.oid, c.revision)), repo.commits[-1].oid)
        etag = held.lfs_sha256 or git_blob_oid(held.data)
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, held.data

    def _dataset_info(self, match, body, raw):
        repo_id, revision = match.group(1), unquote(match.group(2))
        if (err := self._revision_error(repo_id, revision)) is not None:
            return err
        commits = self.repos[repo_id].commits
        sha = next((c.oid for c in reversed(commits) if revision in (c.oid, c.revision)))
        return 200, {}, {"id": repo_id, "sha": sha, "private": False, "siblings": [
            {"rfilename": p} for p in self.repos[repo_id].files]}

    def _paths_info(self, match, body, raw):
        repo_id, revision = match.group(1), unquote(match.group(2))
        if (err := self._revision_error(repo_id, revision)) is not None:
            return err
        files = self.repos[repo_id].files
        out = []
        for p in body.get("paths", []):
            if p in files:
                f = files[p]
                entry = {"type": "file", "path": p, "size": len(f.data)}
                if f.lfs_sha256 is None:
                    entry["oid"] = git_blob_oid(f.data)
                else:
                    pointer = lfs_pointer(f.lfs_sha256, len(f.data))
                    entry["oid"] = git_blob_oid(pointer)
                    entry["lfs"] = {"oid": f.lfs_sha256, "size": len(f.data), "pointerSize": len(pointer)}
                out.append(entry)
        return 200, {}, out

    def _preupload(self, match, body, raw):
        repo_id, revision = match.group(1), unquote(match.group(2))
        if (err := self._revision_error(repo_id, revision)) is not None:
            return err
        files = self.repos[repo_id].files
        answer = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            held = files.get(f["path"])
            oid = None if held is None else (held.lfs_sha256 or git_blob_oid(held.data))
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": answer, "commitOid": self.repos[repo_id].commits[-1].oid}

    def _validate_yaml(self, match, body, raw):
        return 200, {}, {"errors": [], "warnings": []}

    def _lfs_batch(self, match, body, raw):
        repo_id = match.group(1)
        if self._repo(repo_id) is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", []):
            return 400, {}, {"error": "the fake Hub offers the basic transfer for uploads only"}
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}}
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _lfs_upload(self, match, body, raw):
        oid = match.group(1)
        if hashlib.sha256(raw).hexdigest() != oid:
            return 400, {}, {"error": "the uploaded bytes do not hash to the object's oid"}
        self.lfs_objects[oid] = raw
        return 200, {}, {}

    def _lfs_verify(self, match, body, raw):
        held = self.lfs_objects.get(body["oid"])
        if held is None or len(held) != body["size"]:
            return 404, {}, {"error": "object not found"}
        return 200, {}, {}

    def _commit(self, match, lines, raw):
        repo_id, revision = match.group(1), unquote(match.group(2))
        if (err := self._revision_error(repo_id, revision)) is not None:
            return err
        repo = self.repos[repo_id]
        header = next(line["value"] for line in lines if line["key"] == "header")
        new: dict[str, StoredFile] = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                new[value["path"]] = StoredFile(base64.b64decode(value["content"]), None)
            elif line["key"] == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None:   # the Hub refuses a pointer to an object it does not hold
                    return 422, {}, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                new[value["path"]] = StoredFile(data, value["oid"])
            elif line["key"] != "header":
                return 400, {}, {"error": f"the fake Hub does not handle {line['key']} lines"}
        repo.files.update(new)
        commit = Commit(self._new_oid(repo), revision, header["summary"], header.get("description", ""), list(new))
        repo.commits.append(commit)
        return 200, {}, {"success": True, "commitOid": commit.oid, "hookOutput": "",
                         "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}"}

    @staticmethod
    def _new_oid(repo: Repo) -> str:
        return hashlib.sha1(f"{repo.repo_id} commit {len(repo.commits)}".encode()).hexdigest()


@contextmanager
def running_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started FakeHub that `release --push` talks to (HF_ENDPOINT), with Xet off (see the module
    docstring); stopped afterwards. For a test fixture: monkeypatch undoes the rest."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        yield hub
    finally:
        hub.stop()


_REPO = r"([^/]+/[^/]+)"
_ROUTES = [
    ("HEAD", re.compile(rf"^/datasets/{_REPO}/resolve/([^/]+)/(.+)$"), "resolve"),
    ("GET", re.compile(rf"^/datasets/{_REPO}/resolve/([^/]+)/(.+)$"), "resolve"),
    ("GET", re.compile(rf"^/api/datasets/{_REPO}/revision/(.+)$"), "dataset_info"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/([^/]+)/(.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/([^/]+)/(.+)$"), "resolve"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/paths-info/(.+)$"), "paths_info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(.+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(.+)$"), "commit"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/lfs-objects/([0-9a-f]{64})$"), "lfs_upload"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/xet-write-token/(.+)$"), "xet"),
]


def _route(method: str, path: str) -> tuple[str, re.Match | None]:
    for want, pattern, op in _ROUTES:
        m = pattern.match(path)
        if m and method == want:
            return op, m
    return "unexpected", None


def _decode_body(op: str, headers: dict[str, str], raw: bytes) -> Any:
    if op == "lfs_upload" or not raw:
        return None
    if op == "commit":
        return [json.loads(line) for line in raw.splitlines() if line.strip()]
    if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = parse_qs(raw.decode(), keep_blank_values=True)
        return {"paths": form.get("paths", []), "expand": form.get("expand", [""])[0] == "true"}
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            raw = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, answer = hub.handle(self.command, self.path, headers, raw)
            binary = isinstance(answer, bytes)        # a file's bytes; everything else is JSON
            data = answer if binary else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        def log_message(self, format: str, *args) -> None:   # quiet: the records are in hub.requests
            pass

    return Handler
