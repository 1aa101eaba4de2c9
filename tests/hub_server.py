"""A small Hugging Face Hub look-alike for tests, built on the standard library only.

`LocalHub` serves the subset of the Hub HTTP API that `huggingface_hub` (2.x) and `transformers` call to create
repos, commit files (regular and Git LFS) and download them again, on 127.0.0.1 in a daemon thread::

    hub = LocalHub(tmp_path / "hub").start()
    env = hub.client_env(tmp_path / "hf_home")  # run huggingface_hub / transformers in a subprocess with it
    ...
    hub.stop()

Model, space and dataset repos are supported (`/api/{models,spaces,datasets}/...` and the `spaces/` and `datasets/`
URL prefixes): the library pushes models, its `evaluate` metrics as Spaces, and token datasets. Every commit stores a
full file snapshot, so old revisions stay readable and branch heads move atomically. File contents live in `<root>/blobs/<sha256>`, repo metadata in `<root>/state.json`, so a new
`LocalHub` on the same folder serves the same repos.

Not implemented: Xet (clients must run with `HF_HUB_DISABLE_XET=1`), multipart LFS, pagination, discussions,
real permissions (any bearer token is user `testuser`, who may write to any namespace). Unknown routes answer a
404 JSON error.

Run by hand: `python tests/hub_server.py --port 8765` then `HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


USER = "testuser"
WHOAMI = {
    "type": "user",
    "name": USER,
    "fullname": "Test User",
    "orgs": [{"type": "org", "name": "org"}],
    "auth": {"type": "access_token", "accessToken": {"displayName": "dummy", "role": "write"}},
}
URL_PREFIX = {"model": "", "space": "spaces/", "dataset": "datasets/"}
# Files committed as LFS whatever their size (besides files over `lfs_threshold` and files with NUL bytes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".npy", ".npz", ".pkl", ".zip")
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
SPACE_RUNTIME = {"stage": "RUNNING", "hardware": {"current": "cpu-basic", "requested": "cpu-basic"}}


def _now() -> str:
    """A timestamp in the only format `huggingface_hub.utils.parse_datetime` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (`git hash-object`): what the Hub calls a file's `oid` / `blobId`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error; `code` goes in `X-Error-Code`, which the client maps to its exception classes."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, dict(headers or {}), extra
        if code:
            self.headers["X-Error-Code"] = code
        self.headers["X-Error-Message"] = message


class LocalHub:
    """A threaded Hub-compatible server bound to 127.0.0.1, keeping its state in `root`.

    Args:
        root: folder for blobs and metadata (created if missing; reused if it holds a previous state).
        port: TCP port, 0 (default) for a free one.
        lfs_threshold: files larger than this many bytes are uploaded through Git LFS.
        verbose: log every request to stderr.

    Attributes: `url` (endpoint, once started), `root`, `requests` (list of `(method, path, status)` served).
    """

    def __init__(self, root: str | os.PathLike, *, port: int = 0, lfs_threshold: int = 10 * 2**20, verbose=False):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.port, self.lfs_threshold, self.verbose = port, lfs_threshold, verbose
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, int]] = []
        state = self.root / "state.json"
        self.repos: dict[str, dict] = json.loads(state.read_text()) if state.exists() else {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str | os.PathLike, base: dict | None = None) -> dict[str, str]:
        """Environment for a subprocess running huggingface_hub / transformers against this server.

        huggingface_hub reads these once, at import: they must be set before it is imported.
        """
        env = dict(os.environ if base is None else base)
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE",
                    "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):  # fmt: skip
            env.pop(var, None)  # they would override HF_HOME / HF_HUB_OFFLINE (evaluate reads the last two)
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN="dummy",
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env

    # -- storage ---------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def store_blob(self, data: bytes) -> str:
        """Store `data` content-addressed (atomic rename), return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            tmp = path.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha256

    def _save(self) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(self.repos))
        os.replace(tmp, self.root / "state.json")

    def repo(self, kind: str, repo_id: str, authed: bool = True) -> dict:
        repo = self.repos.get(f"{kind}s/{repo_id}")
        if repo is None or (repo["private"] and not authed):
            raise HubError(404, f"Repository Not Found for {kind} {repo_id}", "RepoNotFound")
        return repo

    def snapshot(self, kind: str, repo_id: str, rev: str, authed: bool = True) -> tuple[str, dict, dict]:
        """Resolve `rev` (branch, tag, PR ref or commit sha) to `(commit sha, {path: entry}, repo)`."""
        repo = self.repo(kind, repo_id, authed)
        rev = rev.removeprefix("refs/heads/")
        sha = repo["branches"].get(rev) or repo["tags"].get(rev) or (rev if rev in repo["commits"] else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha, repo["commits"][sha]["files"], repo

    def create_repo(self, kind: str, repo_id: str, private: bool = False, sdk: str | None = None) -> dict:
        """Create a repo whose `main` holds one commit with a `.gitattributes` file, like the Hub does."""
        with self.lock:
            if f"{kind}s/{repo_id}" in self.repos:  # the client reads "url" even from this answer
                raise HubError(409, f"You already created this {kind} repo", url=self.repo_url(kind, repo_id))
            repo = {"kind": kind, "id": repo_id, "private": private, "sdk": sdk, "createdAt": _now()}
            repo.update(branches={}, tags={}, commits={}, prs=0)
            self.repos[f"{kind}s/{repo_id}"] = repo
            attributes = self.store_blob(GITATTRIBUTES)
            repo["branches"]["main"] = self._new_commit(
                repo, None, {}, [("add", ".gitattributes", attributes, False)], "initial commit", ""
            )
            self._save()
            return repo

    def commit(self, kind, repo_id, rev, ops, title, message="", parent=None, create_pr=False) -> tuple[str, str]:
        """Apply `ops` on top of branch `rev` as one new commit; return `(sha, ref it was committed to)`.

        `ops` are `("add", path, sha256, is_lfs)`, `("deletedFile", path, ...)` or `("deletedFolder", path, ...)`.
        The branch head moves once, under the lock: readers see all the files of a commit or none.
        """
        with self.lock:
            head, files, repo = self.snapshot(kind, repo_id, rev)
            ref = rev.removeprefix("refs/heads/")
            if ref not in repo["branches"]:
                raise HubError(400, f"Can only commit to a branch, not {rev}")
            if parent and not create_pr and not head.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            if create_pr:
                repo["prs"] += 1
                ref = f"refs/pr/{repo['prs']}"
            repo["branches"][ref] = self._new_commit(repo, head, files, ops, title, message)
            self._save()
            return repo["branches"][ref], ref

    def _new_commit(self, repo: dict, parent: str | None, files: dict, ops: list, title: str, message: str) -> str:
        files = dict(files)  # entries are never mutated: older snapshots share them
        added = []
        for op, path, sha256, lfs in ops:
            if op == "add":
                blob = self.blob_path(sha256)
                if not blob.exists():
                    raise HubError(422, f"LFS object {sha256} of {path} was never uploaded")
                size = blob.stat().st_size
                oid = _git_blob_sha(_lfs_pointer(sha256, size) if lfs else blob.read_bytes())
                files[path] = {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}
                added.append(path)
            elif op == "deletedFile" and files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif op == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                if not [files.pop(p) for p in list(files) if p.startswith(prefix)]:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
        date = _now()
        seed = json.dumps([parent, title, message, date, len(repo["commits"]), sorted(files.items())])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        for path in added:
            files[path] = {**files[path], "commit": sha}
        repo["commits"][sha] = {"parent": parent, "title": title, "message": message, "date": date, "files": files}
        return sha

    def repo_url(self, kind: str, repo_id: str) -> str:
        return f"{self.url}/{URL_PREFIX[kind]}{repo_id}"

    def upload_mode(self, path: str, size: int, sample: bytes) -> str:
        lfs = size > self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample
        return "lfs" if lfs else "regular"


def _entry_json(repo: dict, files: dict, path: str, expand: bool = False) -> dict:
    """The tree / paths-info JSON of the file or folder `path` in snapshot `files`."""
    if path in files:
        entry = files[path]
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
            out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
        if expand:
            commit = repo["commits"][entry["commit"]]
            out["lastCommit"] = {"id": entry["commit"], "title": commit["title"], "date": commit["date"]}
        return out
    children = "".join(f"{p}{e['oid']}" for p, e in sorted(files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(children.encode()).hexdigest(), "size": 0, "path": path}


def _listing(files: dict, path: str, recursive: bool) -> list[str] | None:
    """Paths of the files and folders under folder `path` ('' for the root); None when there is no such folder."""
    prefix = f"{path}/" if path else ""
    found = set()
    for file in files:
        if file.startswith(prefix):
            parts = file[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            found.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
    return sorted(found) if found or not path else None


# Routes: (methods, regex on the still-quoted URL path, handler method). Groups are unquoted before the call.
_API = r"/api/(models|spaces|datasets)/([^/]+/[^/]+)"  # -> kind (plural), repo_id
_GIT = r"/(?:(spaces|datasets)/)?([^/]+/[^/]+?)"  # -> URL prefix, repo_id
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/(models|spaces|datasets)", "list_repos"),
    ("GET", _API + r"(?:/revision/(.+))?", "repo_info"),
    ("GET", _API + r"/tree/([^/]+)(?:/(.*))?", "tree"),
    ("POST", _API + r"/paths-info/([^/]+)", "paths_info"),
    ("GET", _API + r"/commits/([^/]+)", "commits"),
    ("GET", _API + r"/refs", "refs"),
    ("POST DELETE", _API + r"/branch/([^/]+)", "branch"),
    ("POST DELETE", _API + r"/tag/([^/]+)", "tag"),
    ("POST", _API + r"/preupload/([^/]+)", "preupload"),
    ("POST", _API + r"/commit/([^/]+)", "commit"),
    ("GET", r"/api/spaces/([^/]+/[^/]+)/runtime", "space_runtime"),
    ("POST", _GIT + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs/([0-9a-f]{64})", "lfs_put"),
    ("POST", r"/lfs/verify", "lfs_verify"),
    ("GET HEAD", _GIT + r"/resolve/([^/]+)/(.+)", "resolve"),
]
ROUTES = [(methods.split(), re.compile(pattern), name) for methods, pattern, name in ROUTES]


class _Handler(BaseHTTPRequestHandler):
    """One request. `hub` is set on a per-server subclass; endpoint methods return JSON-able objects."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length

    def do_GET(self):
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.authed = self.headers.get("Authorization", "").startswith("Bearer ")
        try:
            self.body = self._read_body()  # always drain the body, so the connection stays usable
            for methods, pattern, name in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and self.command in methods:
                    result = getattr(self, name)(*[g if g is None else unquote(g) for g in match.groups()])
                    if result is not None:
                        self._send_json(result)
                    return
            raise HubError(404, f"Not found: {self.command} {url.path}")
        except HubError as e:
            self._send_json({"error": e.message, **e.extra}, e.status, e.headers)
        except (ValueError, KeyError, TypeError) as e:  # malformed request body
            self._send_json({"error": f"Bad request: {type(e).__name__}: {e}"}, 400)
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True
        except Exception as e:  # a bug here must not kill the server
            traceback.print_exc()
            self._send_json({"error": f"{type(e).__name__}: {e}"}, 500)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the empty line
            pass
        return b"".join(chunks)

    def _send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": len(body), **(headers or {})}.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json_body(self) -> dict:
        return json.loads(self.body or b"{}")

    def log_request(self, code="-", size="-"):
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, int(code) if isinstance(code, int) else 0))
        if self.hub.verbose:
            super().log_request(code, size)

    # -- account and repos -----------------------------------------------------------------------------------
    def whoami(self):
        if not self.authed:
            raise HubError(401, "Invalid credentials in Authorization header")
        return WHOAMI

    def create_repo(self):
        body = self._json_body()
        kind = body.get("type") or "model"
        if kind not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {kind}")
        if kind == "space" and not body.get("sdk"):
            raise HubError(400, "Spaces need an sdk")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        self.hub.create_repo(kind, repo_id, private, body.get("sdk"))
        return {"url": self.hub.repo_url(kind, repo_id), "name": repo_id, "id": repo_id}

    def delete_repo(self):
        body = self._json_body()
        key = f"{body.get('type') or 'model'}s/{body.get('organization') or USER}/{body['name']}"
        with self.hub.lock:
            if self.hub.repos.pop(key, None) is None:
                raise HubError(404, f"Repository Not Found: {key}", "RepoNotFound")
            self.hub._save()
        return {}

    def validate_yaml(self):
        return {"errors": [], "warnings": []}

    def list_repos(self, kinds):
        author, search, limit = self.query.get("author"), self.query.get("search", ""), self.query.get("limit")
        with self.hub.lock:
            found = [
                self._info(repo, repo["branches"]["main"], siblings=False)
                for repo in self.hub.repos.values()
                if repo["kind"] == kinds[:-1]
                and (self.authed or not repo["private"])
                and author in (None, repo["id"].split("/")[0])
                and search.lower() in repo["id"].lower()
            ]
        return found[: int(limit)] if limit else found

    def repo_info(self, kinds, repo_id, rev=None):
        with self.hub.lock:
            sha, files, repo = self.hub.snapshot(kinds[:-1], repo_id, rev or "main", self.authed)
            return self._info(repo, sha, blobs=self.query.get("blobs", "").lower() in ("true", "1"))

    def _info(self, repo: dict, sha: str, siblings: bool = True, blobs: bool = False) -> dict:
        files = repo["commits"][sha]["files"]
        info = {
            "id": repo["id"],
            "author": repo["id"].split("/")[0],
            "sha": sha,
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "createdAt": repo["createdAt"],
            "lastModified": repo["commits"][sha]["date"],
            "likes": 0,
            "downloads": 0,
            "tags": [],
            "usedStorage": sum(entry["size"] for entry in files.values()),
        }
        if siblings:
            info["siblings"] = [{"rfilename": path} for path in sorted(files)]
        if blobs:
            for sibling in info["siblings"]:
                entry = _entry_json(repo, files, sibling["rfilename"])
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], **entry["lfs"]}
        if repo["kind"] == "space":
            info.update(sdk=repo["sdk"], runtime=SPACE_RUNTIME, subdomain=repo["id"].replace("/", "-"))
        return info

    def space_runtime(self, repo_id):
        with self.hub.lock:
            self.hub.repo("space", repo_id, self.authed)
        return SPACE_RUNTIME

    # -- browsing --------------------------------------------------------------------------------------------
    def tree(self, kinds, repo_id, rev, path=None):
        recursive = self.query.get("recursive", "").lower() in ("true", "1")
        expand = self.query.get("expand", "").lower() in ("true", "1")
        with self.hub.lock:
            sha, files, repo = self.hub.snapshot(kinds[:-1], repo_id, rev, self.authed)
            paths = _listing(files, (path or "").strip("/"), recursive)
            if paths is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
            return [_entry_json(repo, files, p, expand) for p in paths]

    def paths_info(self, kinds, repo_id, rev):
        form = parse_qs(self.body.decode())
        expand = form.get("expand", ["false"])[-1].lower() in ("true", "1")
        with self.hub.lock:
            sha, files, repo = self.hub.snapshot(kinds[:-1], repo_id, rev, self.authed)
            paths = [p.strip("/") for p in form.get("paths", [])]
            return [_entry_json(repo, files, p, expand) for p in paths if p in files or _listing(files, p, False)]

    def commits(self, kinds, repo_id, rev):
        with self.hub.lock:
            sha, _, repo = self.hub.snapshot(kinds[:-1], repo_id, rev, self.authed)
            history = []
            while sha is not None:
                commit = repo["commits"][sha]
                history.append(
                    {
                        "id": sha,
                        "title": commit["title"],
                        "message": commit["message"],
                        "date": commit["date"],
                        "authors": [{"user": USER}],
                    }
                )
                sha = commit["parent"]
            return history

    def refs(self, kinds, repo_id):
        with self.hub.lock:
            repo = self.hub.repo(kinds[:-1], repo_id, self.authed)
            branches = {n: s for n, s in repo["branches"].items() if not n.startswith("refs/pr/")}
            prs = {n: s for n, s in repo["branches"].items() if n.startswith("refs/pr/")}

            def refs(names: dict, prefix: str) -> list[dict]:
                return [{"name": n, "ref": prefix + n, "targetCommit": s} for n, s in names.items()]

            return {
                "branches": refs(branches, "refs/heads/"),
                "tags": refs(repo["tags"], "refs/tags/"),
                "converts": [],
                "pullRequests": refs(prs, ""),
            }

    def branch(self, kinds, repo_id, name):
        with self.hub.lock:
            repo = self.hub.repo(kinds[:-1], repo_id)
            if self.command == "DELETE":
                if name == "main" or repo["branches"].pop(name, None) is None:
                    raise HubError(404, f"Cannot delete branch {name}", "RevisionNotFound")
            elif name in repo["branches"]:
                raise HubError(409, f"Branch {name} already exists")
            else:
                start = self._json_body().get("startingPoint") or "main"
                repo["branches"][name] = self.hub.snapshot(kinds[:-1], repo_id, start)[0]
            self.hub._save()
        return {}

    def tag(self, kinds, repo_id, rev_or_tag):
        with self.hub.lock:
            repo = self.hub.repo(kinds[:-1], repo_id)
            if self.command == "DELETE":  # DELETE .../tag/{tag}
                if repo["tags"].pop(rev_or_tag, None) is None:
                    raise HubError(404, f"Tag {rev_or_tag} not found", "RevisionNotFound")
            else:  # POST .../tag/{revision} {"tag": name}
                name = self._json_body()["tag"]
                if name in repo["tags"]:
                    raise HubError(409, f"Tag {name} already exists")
                repo["tags"][name] = self.hub.snapshot(kinds[:-1], repo_id, rev_or_tag)[0]
            self.hub._save()
        return {}

    # -- uploads: preupload -> LFS batch + PUT (+ verify) -> commit ------------------------------------------
    def preupload(self, kinds, repo_id, rev):
        with self.hub.lock:
            sha, files, _ = self.hub.snapshot(kinds[:-1], repo_id, rev)
        answers = []
        for file in self._json_body().get("files", []):
            mode = self.hub.upload_mode(file["path"], file["size"], base64.b64decode(file.get("sample", "")))
            answer = {"path": file["path"], "uploadMode": mode, "shouldIgnore": False}
            if file["path"] in files:  # lets the client skip unchanged files: sha256 for LFS, git oid otherwise
                entry = files[file["path"]]
                answer["oid"] = entry["sha256"] if entry["lfs"] else entry["oid"]
            answers.append(answer)
        return {"files": answers, "commitOid": sha}

    def lfs_batch(self, prefix, repo_id):
        with self.hub.lock:
            self.hub.repo((prefix or "models")[:-1], repo_id)
        objects = []
        for obj in self._json_body().get("objects", []):
            obj = {"oid": obj["oid"], "size": obj["size"]}
            if not self.hub.blob_path(obj["oid"]).exists():  # no "actions": the object is already there
                upload, verify = {"href": f"{self.hub.url}/lfs/{obj['oid']}"}, {"href": f"{self.hub.url}/lfs/verify"}
                obj.update(authenticated=True, actions={"upload": upload, "verify": verify})
            objects.append(obj)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        self.hub.store_blob(self.body)
        return {}

    def lfs_verify(self):
        body = self._json_body()
        blob = self.hub.blob_path(body.get("oid", "missing"))
        if not blob.exists() or blob.stat().st_size != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} not found")
        return {}

    def commit(self, kinds, repo_id, rev):
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        ops = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = value["content"]
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                ops.append(("add", value["path"], self.hub.store_blob(data), False))
            elif key == "lfsFile":
                ops.append(("add", value["path"], value["oid"], True))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, value["path"], None, None))
        create_pr = self.query.get("create_pr") == "1"
        title, message, parent = header.get("summary", ""), header.get("description", ""), header.get("parentCommit")
        sha, ref = self.hub.commit(kinds[:-1], repo_id, rev, ops, title, message, parent, create_pr)
        base = self.hub.repo_url(kinds[:-1], repo_id)
        pr_url = f"{base}/discussions/{ref.rsplit('/', 1)[-1]}" if create_pr else None
        return {"success": True, "commitOid": sha, "commitUrl": f"{base}/commit/{sha}", "pullRequestUrl": pr_url}

    # -- downloads -------------------------------------------------------------------------------------------
    def resolve(self, prefix, repo_id, rev, path):
        with self.hub.lock:
            sha, files, _ = self.hub.snapshot((prefix or "models")[:-1], repo_id, rev, self.authed)
        entry = files.get(path)
        if entry is None:  # X-Repo-Commit lets the client cache the absence of the file
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        headers = {"Content-Type": "application/octet-stream", "Content-Length": entry["size"]}
        headers.update({"X-Repo-Commit": sha, "ETag": etag})  # never X-Xet-Hash: that would switch to Xet
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": entry["size"]})
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command == "GET":
            with open(self.hub.blob_path(entry["sha256"]), "rb") as f:
                shutil.copyfileobj(f, self.wfile)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local Hugging Face Hub look-alike on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765, help="port (0 for a free one)")
    parser.add_argument("--root", help="state folder (default: a new temporary folder)")
    parser.add_argument("--lfs-threshold", type=int, default=10 * 2**20, help="bytes above which files go to LFS")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="localhub-")
    hub = LocalHub(root, port=args.port, lfs_threshold=args.lfs_threshold, verbose=not args.quiet).start()
    print(f"LocalHub ({root}): export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
