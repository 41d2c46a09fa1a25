"""The in-memory Hub of hubserver.py, driven by the real huggingface_hub client in a subprocess.

Tests of publishing and downloading trust this server to answer as the Hub does; these tests check that the
client's own calls (not a mock of them) succeed and fail against it where they would against the Hub.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hubserver import HubServer, run_client

REPO = "tester/tiny-pipeline"


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server
        assert server.errors == []


def _result(stdout: str) -> dict:
    """The JSON the client script prints on its last line (the client may log above it)."""
    return json.loads(stdout.strip().splitlines()[-1])


def test_publish_then_download_round_trip(hub: HubServer, tmp_path: Path) -> None:
    hub.page_size = 3  # 6 files and 2 folders: the listing takes three pages
    script = f"""
import json, os
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

api = HfApi()
repo = {REPO!r}
api.create_repo(repo, private=True)
api.create_repo(repo, exist_ok=True)
initial = api.repo_info(repo).sha
api.create_branch(repo, branch="staging")
ops = [
    CommitOperationAdd("model_index.json", b'{{"_class_name": "Tiny"}}'),
    CommitOperationAdd("README.md", b"---\\nlicense: openrail++\\ntags:\\n- diffusers\\n---\\n# Tiny\\n"),
    CommitOperationAdd("unet/config.json", b"{{}}"),
    CommitOperationAdd("unet/diffusion_pytorch_model.safetensors", os.urandom(1 << 20)),
    CommitOperationAdd("unet/package.pt2", os.urandom(4096)),
    CommitOperationAdd("empty.txt", b""),
]
commit = api.create_commit(repo, ops, commit_message="Publish", revision="staging")
info = api.repo_info(repo, revision="staging")
out = {{
    "initial": initial,
    "commit": commit.oid,
    "info_sha": info.sha,
    "license": info.card_data.license,
    "files": api.list_repo_files(repo, revision="staging"),
    "download": hf_hub_download(repo, "unet/diffusion_pytorch_model.safetensors", revision="staging"),
    "snapshot": snapshot_download(repo, revision=commit.oid),
}}
try:
    api.create_commit(repo, [CommitOperationAdd("model_index.json", b"{{}}")], commit_message="Stale",
                      revision="staging", parent_commit=initial)
except HfHubHTTPError as error:
    out["stale"] = error.response.status_code
for name, call in [("no_repo", lambda: api.model_info("tester/missing")),
                   ("no_revision", lambda: api.model_info(repo, revision="nope"))]:
    try:
        call()
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        out[name] = type(error).__name__
print(json.dumps(out))
"""
    out = _result(run_client(hub, tmp_path, script).stdout)

    assert hub.commits(REPO, "staging") == [out["commit"], out["initial"]]
    assert hub.commits(REPO) == [out["initial"]]  # main untouched
    assert out["info_sha"] == out["commit"] == hub.head(REPO, "staging")
    assert out["license"] == "openrail++"
    files = hub.files(REPO, out["commit"])
    assert sorted(out["files"]) == sorted(files)
    assert hub.lfs_paths(REPO, "staging") == {"unet/diffusion_pytorch_model.safetensors", "unet/package.pt2"}
    assert hub.requests.count(("GET", f"/api/models/{REPO}/tree/staging")) == 3  # list_repo_files followed the pages
    assert Path(out["download"]).read_bytes() == files["unet/diffusion_pytorch_model.safetensors"]
    snapshot = Path(out["snapshot"])
    assert {path: (snapshot / path).read_bytes() for path in files} == files
    assert out["stale"] == 412
    assert hub.head(REPO, "staging") == out["commit"]
    assert out["no_repo"] == "RepositoryNotFoundError"
    assert out["no_revision"] == "RevisionNotFoundError"


# The client retries a 500 five times, a second apart: realistic but slow, so that case is left to `-m slow`.
@pytest.mark.parametrize("status", [403, pytest.param(500, marks=pytest.mark.slow)])
def test_failed_lfs_upload_commits_nothing(hub: HubServer, tmp_path: Path, status: int) -> None:
    hub.create_repo(REPO)
    hub.commit(REPO, {"model_index.json": b"{}"})
    before = hub.commits(REPO)
    hub.fail_lfs_uploads_after = 0
    hub.lfs_failure_status = status
    script = f"""
import json, os
from huggingface_hub import CommitOperationAdd, HfApi

ops = [CommitOperationAdd("model_index.json", b'{{"v": 2}}'),
       CommitOperationAdd("unet/diffusion_pytorch_model.safetensors", os.urandom(1 << 16))]
try:
    HfApi().create_commit({REPO!r}, ops, commit_message="Publish")
except Exception as error:
    print(json.dumps({{"error": type(error).__name__}}))
else:
    print(json.dumps({{"error": None}}))
"""
    out = _result(run_client(hub, tmp_path, script).stdout)

    assert out["error"] is not None
    assert hub.commits(REPO) == before
    assert hub.lfs_objects == {}
    assert ("POST", f"/api/models/{REPO}/commit/main") not in hub.requests
    uploads = [path for method, path in hub.requests if method == "PUT"]
    assert len(uploads) == (1 if status == 403 else 6)  # the first try, and the five retries of a 500


def test_offline_snapshot_is_served_from_the_cache(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo(REPO)
    cached = hub.commit(REPO, {"model_index.json": b"{}", "unet/model.safetensors": b"\x00" * 1024})
    uncached = hub.commit(REPO, {"model_index.json": b'{"v": 2}'})
    run_client(
        hub,
        tmp_path,
        f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r}, revision={cached!r})",
    )
    hub.reset_requests()
    script = f"""
import json
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

out = {{"cached": snapshot_download({REPO!r}, revision={cached!r})}}
try:
    snapshot_download({REPO!r}, revision={uncached!r})
except LocalEntryNotFoundError as error:
    out["uncached"] = type(error).__name__
print(json.dumps(out))
"""
    out = _result(run_client(hub, tmp_path, script, HF_HUB_OFFLINE="1").stdout)

    files = hub.files(REPO, cached)
    assert {path: (Path(out["cached"]) / path).read_bytes() for path in files} == files
    assert out["uncached"] == "LocalEntryNotFoundError"
    assert hub.requests == []


def test_errors_carry_the_codes_the_client_reads(hub: HubServer) -> None:
    """The client picks its exception from X-Error-Code, and follows Link headers to page through listings."""
    hub.create_repo(REPO)
    hub.commit(REPO, {f"f{i}.json": b"{}" for i in range(3)})
    hub.page_size = 2

    with urllib.request.urlopen(f"{hub.endpoint}/api/models/{REPO}/tree/main") as response:
        assert [entry["path"] for entry in json.load(response)] == ["f0.json", "f1.json"]
        next_url = response.headers["Link"].split(">")[0].lstrip("<")
    with urllib.request.urlopen(next_url) as response:
        assert [entry["path"] for entry in json.load(response)] == ["f2.json"]
        assert response.headers["Link"] is None

    for path, code in [
        ("/api/models/tester/missing", "RepoNotFound"),
        (f"/api/models/{REPO}/revision/nope", "RevisionNotFound"),
        (f"/{REPO}/resolve/main/nope.json", "EntryNotFound"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(hub.endpoint + path)
        assert caught.value.code == 404
        assert caught.value.headers["X-Error-Code"] == code
