"""Round trips through `tests/hub_server.LocalHub` with the real huggingface_hub and transformers clients.

The server runs in a thread of the test process. Client code runs in subprocesses because huggingface_hub reads
HF_ENDPOINT (and the offline flag that conftest.py sets) once, at import time: `LocalHub.client_env` builds their
environment.
"""

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hub_server import LocalHub  # tests/ is on sys.path (pytest rootdir-less "prepend" import mode)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # A low LFS threshold keeps the "large" file of the round trip small.
    with LocalHub(tmp_path_factory.mktemp("hub"), lfs_threshold=64 * 1024) as hub:
        yield hub


def run_client(hub: LocalHub, tmp_path: Path, code: str, timeout: int = 180, **args) -> dict:
    """Run `code` in a fresh interpreter wired to `hub`; it gets `args` as `ARGS` and must print a JSON report."""
    script = f"import json, sys\nARGS = json.loads(sys.argv[1])\n{textwrap.dedent(code)}"
    env = hub.client_env(tmp_path / "hf_home")
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps({"work": str(tmp_path), **args})],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"client failed\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http(hub: LocalHub, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """A raw request to the server; returns `(status, headers, body)` without raising on errors."""
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


HUB_ROUND_TRIP = """
import os
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
)

api = HfApi()  # endpoint and token come from HF_ENDPOINT and HF_TOKEN
repo = "testuser/tiny"
report = {"whoami": api.whoami()["name"], "url": str(api.create_repo(repo, exist_ok=True))}
api.create_repo(repo, exist_ok=True)  # the server answers 409, which exist_ok accepts

folder = Path(ARGS["work"]) / "folder"
(folder / "weights").mkdir(parents=True)
(folder / "notes.txt").write_text("version 1\\n")
(folder / "README.md").write_text("---\\nlicense: mit\\ntags: [test]\\n---\\n# Tiny\\n")
blob = os.urandom(ARGS["big_size"])
(folder / "weights" / "blob.bin").write_bytes(blob)
first = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="first upload")
report["first"] = first.oid
report["files"] = api.list_repo_files(repo)
tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True)}
report["lfs"] = {path: getattr(f, "lfs", None) is not None for path, f in tree.items()}
report["blob_ok"] = Path(hf_hub_download(repo, "weights/blob.bin")).read_bytes() == blob
snapshot = Path(snapshot_download(repo))
report["snapshot"] = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
report["snapshot_readme"] = (snapshot / "README.md").read_text()

second = api.upload_file(path_or_fileobj=b"version 2\\n", path_in_repo="notes.txt", repo_id=repo, commit_message="v2")
report["second"] = second.oid
report["main_sha"] = api.model_info(repo).sha
report["notes_main"] = Path(hf_hub_download(repo, "notes.txt")).read_text()
report["notes_first"] = Path(hf_hub_download(repo, "notes.txt", revision=first.oid)).read_text()
report["commits"] = [c.title for c in api.list_repo_commits(repo)]
report["unchanged"] = api.upload_folder(repo_id=repo, folder_path=folder / "weights", path_in_repo="weights").oid
api.create_tag(repo, tag="v1", revision=first.oid)
report["tag_notes"] = Path(hf_hub_download(repo, "notes.txt", revision="v1")).read_text()
report["models"] = [m.id for m in api.list_models(author="testuser")]

def error(fn):
    try:
        fn()
    except Exception as e:
        return sorted(cls.__name__ for cls in (EntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                               RevisionNotFoundError) if isinstance(e, cls))
    return "no error"

report["errors"] = {
    "missing_file": error(lambda: hf_hub_download(repo, "missing.txt")),
    "missing_repo": error(lambda: hf_hub_download("testuser/missing", "notes.txt")),
    "missing_repo_info": error(lambda: api.model_info("testuser/missing")),
    "missing_revision": error(lambda: hf_hub_download(repo, "notes.txt", revision="no-such-branch")),
}
print(json.dumps(report))
"""


def test_hub_round_trip(hub, tmp_path):
    report = run_client(hub, tmp_path, HUB_ROUND_TRIP, big_size=100 * 1024)
    assert report["whoami"] == "testuser"
    assert report["url"] == f"{hub.url}/testuser/tiny"
    assert sorted(report["files"]) == [".gitattributes", "README.md", "notes.txt", "weights/blob.bin"]
    assert report["lfs"] == {
        ".gitattributes": False,
        "README.md": False,
        "notes.txt": False,
        "weights": False,
        "weights/blob.bin": True,
    }
    assert report["blob_ok"]
    assert report["snapshot"] == sorted(report["files"])
    assert report["snapshot_readme"].startswith("---\nlicense: mit")
    # The second commit moved main; the first one is still readable.
    assert report["second"] != report["first"] and report["main_sha"] == report["second"]
    assert (report["notes_main"], report["notes_first"], report["tag_notes"]) == (
        "version 2\n",
        "version 1\n",
        "version 1\n",
    )
    assert report["commits"] == ["v2", "first upload", "initial commit"]
    assert report["unchanged"] == report["second"]  # nothing changed: the client skipped the commit
    assert "testuser/tiny" in report["models"]
    assert report["errors"] == {
        "missing_file": ["EntryNotFoundError", "RemoteEntryNotFoundError"],
        "missing_repo": ["RepositoryNotFoundError"],
        "missing_repo_info": ["RepositoryNotFoundError"],
        "missing_revision": ["RevisionNotFoundError"],
    }
    # The large file went through the LFS batch API and a PUT; the README was validated.
    paths = [(method, path.split("?")[0]) for method, path, _ in hub.requests]
    assert ("POST", "/testuser/tiny.git/info/lfs/objects/batch") in paths
    assert any(method == "PUT" and path.startswith("/lfs/") for method, path in paths)
    assert ("POST", "/api/validate-yaml") in paths


SPACE = """
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download

api = HfApi()
space = api.create_repo("org/demo", repo_type="space", space_sdk="gradio", private=True)
api.upload_file(path_or_fileobj=b"import gradio\\n", path_in_repo="app.py", repo_id="org/demo", repo_type="space")
print(json.dumps({
    "space_url": str(space),
    "space_sdk": api.space_info("org/demo").sdk,
    "app": Path(hf_hub_download("org/demo", "app.py", repo_type="space")).read_text(),
}))
"""


def test_space_repos(hub, tmp_path):
    """The `evaluate` metrics are published as Spaces (scripts/push_metric.py)."""
    report = run_client(hub, tmp_path, SPACE)
    assert report["space_url"] == f"{hub.url}/spaces/org/demo"
    assert report["space_sdk"] == "gradio"
    assert report["app"] == "import gradio\n"
    # A private repo is invisible without a token.
    status, headers, _ = http(hub, "GET", "/spaces/org/demo/resolve/main/app.py")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_errors_and_unknown_routes(hub):
    status, _, body = http(hub, "GET", "/api/agent-harnesses")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = http(hub, "POST", "/no/such/route/at/all", b"{}")
    assert status == 404 and "error" in json.loads(body)
    status, headers, _ = http(hub, "HEAD", "/testuser/never-created/resolve/main/x.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, _, _ = http(hub, "GET", "/api/whoami-v2")
    assert status == 401  # no token
    status, _, body = http(hub, "GET", "/api/whoami-v2", headers={"Authorization": "Bearer anything"})
    assert status == 200 and json.loads(body)["name"] == "testuser"
    status, _, _ = http(hub, "PUT", "/lfs/" + "0" * 64, b"not matching the sha256")
    assert status == 400
    status, _, body = http(hub, "POST", "/api/repos/create", b"not json")
    assert status == 400 and "error" in json.loads(body)  # bad input is a client error, not a crash
