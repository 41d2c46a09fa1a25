"""The Hub: push an artifact in one commit, load it back by repo id at a pinned commit, trusted, on a host it fits.

There is no Hub access here, so huggingface_hub's real client talks to a Hub-compatible server on 127.0.0.1
(``hubserver.py``). The client reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so everything that
touches the Hub runs in a subprocess with them set.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffbake
from diffbake.errors import TrustError
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import MANIFEST_FILE, read_manifest
from diffbake.hub.fetch import Build, choose_build, is_repo_id
from diffbake.hub.push import default_build_name
from helpers import edit_manifest, rehash
from hubserver import HubServer, client_env, front_matter

REPO = "tester/tiny-sd"
BASE = "tester/base-model"
PROMPT = "a photo of a cat"

# Runs in a subprocess: loads a repo id (or fails with a typed error) and reports what happened as JSON.
LOAD = """
import json, sys
import numpy as np, torch, diffbake
args = json.loads(sys.argv[1])
stages = []
try:
    pipe = diffbake.load(
        args["repo"], revision=args.get("revision"), trust_remote_code=args.get("trust", False),
        build=args.get("build"), progress=lambda stage, detail: stages.append([stage, detail]),
    )
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e), "stages": stages}))
    sys.exit(0)
if args.get("image"):
    g = torch.Generator().manual_seed(0)
    np.save(args["image"], pipe(args["prompt"], num_inference_steps=2, generator=g, output_type="np").images)
from diffbake.runtime.serving import loaded_artifact
print(json.dumps({"root": str(loaded_artifact(pipe).root), "stages": stages}))
"""


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        server.page_size = 4  # tree listings of a build take several pages, as a real model's do
        yield server
        assert not server.errors, server.errors


def _env(hub: HubServer, home: Path, **extra: str) -> dict[str, str]:
    env = client_env(hub, home)
    env["DIFFBAKE_HUB_CACHE"] = str(home / "diffbake-hub")
    env.update(extra)
    return env


def _cli(hub: HubServer, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffbake.cli", *args],
        env=_env(hub, home, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _load(hub: HubServer, home: Path, **args) -> dict:
    env = {k: v for k, v in args.items() if k.isupper()}
    args = {k: v for k, v in args.items() if not k.isupper()}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, json.dumps({"prompt": PROMPT, **args})],
        env=_env(hub, home, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _push(hub: HubServer, home: Path, artifact: Path, repo: str, *args: str) -> str:
    proc = _cli(hub, home, "push", str(artifact), repo, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _downloads(hub: HubServer) -> list[str]:
    """Paths of files fetched through resolve (GET), excluding HEAD requests for metadata."""
    return [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]


@pytest.fixture(scope="module")
def hub_artifact(hub, artifacts, tmp_path_factory) -> Path:
    """The tiny SD artifact, recorded as built from a Hub model (so the card names a base model and license)."""
    folder = Path(shutil.copytree(artifacts("sd"), tmp_path_factory.mktemp("hub") / "tiny-sd"))
    base_sha = hub.create_repo(BASE, card_data={"license": "openrail++"})
    edit_manifest(folder, lambda m: m["source"].update(model=BASE, kind="hub", revision=base_sha))
    return folder


@pytest.fixture(scope="module")
def pushed(hub, hub_artifact, tmp_path_factory) -> dict:
    base_sha = read_manifest(hub_artifact).source["revision"]
    home = tmp_path_factory.mktemp("pusher")
    before = len(hub.commits(REPO)) if REPO in hub.repo_ids() else 0
    proc = _cli(hub, home, "push", str(hub_artifact), REPO)
    assert proc.returncode == 0, proc.stderr
    return {"sha": proc.stdout.strip().splitlines()[-1], "before": before, "stderr": proc.stderr, "base": base_sha}


def test_push_is_one_commit_with_every_file_and_a_model_card(hub, hub_artifact, pushed):
    manifest = read_manifest(hub_artifact)
    build = default_build_name(manifest)
    assert pushed["sha"] == hub.head(REPO)
    assert len(hub.commits(REPO)) == pushed["before"] + 2  # the repo's initial commit, then the push
    files = hub.files(REPO, pushed["sha"])
    expected = {f"{build}/{rel}" for rel in [MANIFEST_FILE, *manifest.files]} | {"README.md"}
    assert set(files) == expected
    for rel in [MANIFEST_FILE, *manifest.files]:
        assert files[f"{build}/{rel}"] == (hub_artifact / rel).read_bytes(), rel
    # Weights and compiled code go through LFS, as large binaries do on the Hub.
    lfs = hub.lfs_paths(REPO, pushed["sha"])
    assert {f"{build}/{p}" for p in manifest.files if p.endswith((".pt2", ".safetensors"))} <= lfs

    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["library_name"] == "diffbake"
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["base_model"] == BASE
    assert meta["license"] == "openrail++"  # the base model's, read from its Hub card
    assert "diffbake" in meta["tags"]
    assert f"at revision `{pushed['base']}`" in card
    assert f'diffbake.load("{REPO}", revision="<commit sha>", trust_remote_code=True)' in card
    assert f"diffbake pull {REPO} --revision <commit sha>" in card
    assert f"| `{build}` | cpu |" in card
    unet = manifest.components["unet"].variants[0]
    assert f"max |compiled - eager| {unet.max_abs_error:.2e}" in card
    # The sha to pin is printed last, with the line that loads it.
    assert f'revision="{pushed["sha"]}", trust_remote_code=True' in pushed["stderr"]


def test_load_by_repo_id_matches_the_local_artifact(hub, pushed, hub_artifact, tmp_path):
    home = tmp_path / "server-host"
    got = _load(hub, home, repo=REPO, revision=pushed["sha"], trust=True, image=str(tmp_path / "hub.npy"))
    assert "error" not in got, got
    root = Path(got["root"])
    build = default_build_name(read_manifest(hub_artifact))
    assert root == home / "diffbake-hub" / "models--tester--tiny-sd" / pushed["sha"] / build
    assert any(s == "hub" and d.endswith("files hashed against the manifest") for s, d in got["stages"])

    local = diffbake.load(hub_artifact)
    expected = local(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_allclose(np.load(tmp_path / "hub.npy"), expected.images, atol=1e-6)

    # Fetched once: a second load asks the Hub for nothing and checks the stamp instead of hashing again.
    hub.reset_requests()
    again = _load(hub, home, repo=REPO, revision=pushed["sha"], trust=True)
    assert "error" not in again, again
    assert hub.requests == []
    assert ["hub", f"{root}: fetched before, stamp matches"] in again["stages"]
    assert dict(again["stages"])["files"].endswith("stamp matched")

    # Offline: the cached build loads; with diffbake's copy gone, it is rebuilt from huggingface_hub's cache.
    offline = _load(hub, home, repo=REPO, revision=pushed["sha"], trust=True, HF_HUB_OFFLINE="1")
    assert "error" not in offline, offline
    shutil.rmtree(home / "diffbake-hub")
    offline = _load(hub, home, repo=REPO, revision=pushed["sha"], trust=True, HF_HUB_OFFLINE="1")
    assert "error" not in offline, offline
    assert Path(offline["root"]) == root and (root / MANIFEST_FILE).is_file()
    assert hub.requests == []


def test_offline_without_a_cache_fails_clearly(hub, pushed, tmp_path):
    hub.reset_requests()
    got = _load(hub, tmp_path / "empty", repo=REPO, revision=pushed["sha"], trust=True, HF_HUB_OFFLINE="1")
    assert got["error"] == "ArtifactNotFoundError", got
    assert "not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it" in got["message"]
    assert f"diffbake pull {REPO} --revision {pushed['sha']}" in got["message"]
    assert hub.requests == []
    assert not (tmp_path / "empty" / "diffbake-hub").exists()


REFUSALS = """
import json, diffbake
out = []
for kwargs in ({}, {"revision": SHA}, {"trust_remote_code": True}, {"trust_remote_code": True, "revision": "main"},
               {"trust_remote_code": True, "revision": SHA[:12]}):
    try:
        diffbake.load(REPO, **kwargs)
        out.append(["loaded", ""])
    except diffbake.DiffbakeError as e:
        out.append([type(e).__name__, str(e)])
print(json.dumps(out))
"""


def test_remote_code_needs_opt_in_and_a_pinned_commit_before_any_request(hub, pushed, tmp_path):
    hub.reset_requests()
    script = f"REPO = {REPO!r}\nSHA = {pushed['sha']!r}\n" + REFUSALS
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_env(hub, tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    (no_opt_in, sha_only, trust_only, branch, short) = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, _ in (no_opt_in, sha_only, trust_only, branch, short):
        assert kind == "TrustError"
    assert "a Hub artifact contains native code" in no_opt_in[1] and "trust_remote_code=True" in no_opt_in[1]
    assert "a Hub artifact contains native code" in sha_only[1]
    assert f"{REPO}: no revision, but a Hub artifact is fetched only at a pinned commit" in trust_only[1]
    assert "revision 'main'" in branch[1]
    assert f"revision {pushed['sha'][:12]!r}" in short[1]

    pull = _cli(hub, tmp_path, "pull", REPO, "--revision", "main", "--out", str(tmp_path / "out"))
    assert pull.returncode == 1
    assert "revision 'main', but a Hub artifact is fetched only at a pinned commit" in pull.stderr
    assert hub.requests == []
    assert not (tmp_path / "diffbake-hub").exists() and not (tmp_path / "hub").exists()


def test_a_local_path_takes_no_hub_options(artifacts):
    with pytest.raises(ValueError, match="revision= and build= apply to Hub repo ids"):
        diffbake.load(artifacts("sd"), revision="0" * 40)
    with pytest.raises(TrustError, match="no local artifact folder of that name"):
        diffbake.load("no-such/artifact")


def _foreign(folder: Path, torch_version: str | None = None, **host: str) -> Path:
    """An artifact whose manifest records another host, sealed as a build made there would seal it."""

    def edit(m: dict) -> None:
        m["host"].update(host)
        if torch_version is not None:
            m["versions"]["torch"] = torch_version

    edit_manifest(folder, edit)
    return folder


def test_the_build_that_fits_is_chosen_and_misfits_are_listed_with_reasons(hub, artifacts, tmp_path):
    home = tmp_path / "publisher"
    other_torch = _foreign(Path(shutil.copytree(artifacts("sd"), tmp_path / "other-torch")), "2.99.0")
    gpu = _foreign(
        Path(shutil.copytree(artifacts("sd"), tmp_path / "gpu")),
        device="cuda",
        cuda="12.8",
        gpu="NVIDIA H100",
        compute_capability="9.0",
    )
    fits = artifacts("sd")
    for folder, name in ((other_torch, "cpu-torch299"), (gpu, None), (fits, None)):
        _push(hub, home, folder, "tester/fleet", *(["--build", name] if name else []))
    sha = _push(hub, home, other_torch, "tester/misfit", "--build", "cpu-torch299")
    misfit_sha = _push(hub, home, gpu, "tester/misfit")
    assert misfit_sha != sha

    card = hub.files("tester/fleet")["README.md"].decode()
    fit_name, gpu_name = default_build_name(read_manifest(fits)), default_build_name(read_manifest(gpu))
    assert gpu_name.startswith("cuda-sm90-float32-")
    for name in ("cpu-torch299", gpu_name, fit_name):
        assert f"### `{name}`" in card

    hub.reset_requests()
    got = _load(hub, tmp_path / "host", repo="tester/fleet", revision=hub.head("tester/fleet"), trust=True)
    assert "error" not in got, got
    assert Path(got["root"]).name == fit_name
    downloaded = _downloads(hub)
    assert not any(p.endswith((".pt2", ".safetensors")) and f"/{fit_name}/" not in p for p in downloaded), downloaded

    hub.reset_requests()
    got = _load(hub, tmp_path / "host2", repo="tester/misfit", revision=misfit_sha, trust=True)
    assert got["error"] == "CompatibilityError"
    message = got["message"]
    assert "none of its 2 build(s) fits this host" in message
    assert "cpu-torch299" in message and "torch: this artifact was built with '2.99.0'" in message
    assert gpu_name in message
    assert "push it to the same repo with `diffbake push ARTIFACT tester/misfit`" in message
    # Only manifests were fetched: no package or weight byte of a build that cannot run here.
    assert all(p.endswith(MANIFEST_FILE) for p in _downloads(hub)), _downloads(hub)

    named = _load(
        hub,
        tmp_path / "host3",
        repo="tester/fleet",
        revision=hub.head("tester/fleet"),
        trust=True,
        build="cpu-torch299",
    )
    assert named["error"] == "CompatibilityError" and "does not fit this host: torch" in named["message"]
    # Staging for another host: pull takes a named build that does not fit here, and says so.
    fleet = hub.head("tester/fleet")
    staged = tmp_path / "staged"
    proc = _cli(hub, home, "pull", "tester/fleet", "--revision", fleet, "--build", "cpu-torch299", "--out", str(staged))
    assert proc.returncode == 0, proc.stderr
    assert "note: cpu-torch299 does not fit this host (torch: this artifact was built with '2.99.0'" in proc.stderr
    assert read_manifest(staged).versions["torch"] == "2.99.0"


def test_push_that_fails_midway_commits_nothing(hub, artifacts, tmp_path):
    home = tmp_path / "publisher"
    hub.create_repo("tester/flaky")
    before = hub.commits("tester/flaky")
    # Two weight files the server has never seen (a byte changed, the manifest updated): the first upload lands,
    # the second is refused.
    folder = Path(shutil.copytree(artifacts("sd"), tmp_path / "fresh"))
    changed = ["unet/weights.safetensors", "vae_decoder/weights.safetensors"]
    for rel in changed:
        data = bytearray((folder / rel).read_bytes())
        data[-1] ^= 0x01
        (folder / rel).write_bytes(bytes(data))
    rehash(folder, *changed)
    hub.fail_lfs_uploads_after, hub.lfs_failure_status = len(hub.lfs_objects) + 1, 403
    try:
        proc = _cli(hub, home, "push", str(folder), "tester/flaky")
    finally:
        hub.fail_lfs_uploads_after, hub.lfs_failure_status = None, 500
    assert proc.returncode == 1, proc.stderr
    assert f"nothing was committed: main is still at {before[0][:12]}" in proc.stderr
    assert hub.commits("tester/flaky") == before
    assert hub.files("tester/flaky") == {}
    # Run again: it lands whole, in one commit.
    sha = _push(hub, home, folder, "tester/flaky")
    assert hub.commits("tester/flaky") == [sha, *before]
    assert len(hub.files("tester/flaky")) == len(read_manifest(folder).files) + 2  # + manifest + card


def test_pull_stages_a_checked_artifact_folder(hub, pushed, hub_artifact, tmp_path):
    out = tmp_path / "staged"
    proc = _cli(hub, tmp_path / "home", "pull", REPO, "--revision", pushed["sha"], "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    manifest = read_manifest(out)
    assert manifest == read_manifest(hub_artifact)
    assert all(not p.is_symlink() for p in out.rglob("*"))
    assert verify_files(out, manifest) == "full"
    # Pulled again: nothing to do. Something else in the way: refused without --force.
    again = _cli(hub, tmp_path / "home", "pull", REPO, "--revision", pushed["sha"], "--out", str(out))
    assert again.returncode == 0, again.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = _cli(hub, tmp_path / "home", "pull", REPO, "--revision", pushed["sha"], "--out", str(other))
    assert refused.returncode == 1 and "pass --force to replace it" in refused.stderr
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_tampered_file_in_the_repo_is_refused_and_nothing_is_kept(hub, hub_artifact, tmp_path):
    manifest = read_manifest(hub_artifact)
    files = {f"cpu-x/{rel}": (hub_artifact / rel).read_bytes() for rel in [MANIFEST_FILE, *manifest.files]}
    weights = bytearray(files["cpu-x/unet/weights.safetensors"])
    weights[-1] ^= 0xFF
    files["cpu-x/unet/weights.safetensors"] = bytes(weights)
    hub.create_repo("tester/tampered")
    sha = hub.commit("tester/tampered", files)
    got = _load(hub, tmp_path, repo="tester/tampered", revision=sha, trust=True)
    assert got["error"] == "IntegrityError", got
    assert "build cpu-x differs from its manifest" in got["message"] and "unet/weights.safetensors" in got["message"]
    cache = tmp_path / "diffbake-hub" / "models--tester--tampered" / sha
    assert not cache.exists() or list(cache.iterdir()) == []


def test_choice_prefers_gpu_then_the_widest_cpu_build(hub_artifact):
    m = read_manifest(hub_artifact)
    from dataclasses import replace

    narrow = replace(m, host=replace(m.host, cpu_features=m.host.cpu_features[:3]))
    gpu = replace(m, host=replace(m.host, device="cuda", cpu_features=[]))
    builds = [Build("narrow", narrow, None), Build("wide", m, None), Build("gpu", gpu, "no GPU")]
    assert choose_build("o/r", "0" * 40, builds).name == "wide"
    builds[2] = Build("gpu", gpu, None)
    assert choose_build("o/r", "0" * 40, builds).name == "gpu"
    assert is_repo_id("org/name") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")


def test_default_build_names_differ_for_every_distinct_host_requirement(hub_artifact):
    from dataclasses import replace

    m = read_manifest(hub_artifact)
    host = m.host
    avx512 = ["avx2", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
    amx = replace(m, host=replace(host, cpu_capability="AVX512", cpu_features=[*avx512, "amx_tile", "amx_bf16"]))
    no_amx = replace(m, host=replace(host, cpu_capability="AVX512", cpu_features=avx512))
    explicit = replace(m, host=replace(host, cpu_isa="avx512", cpu_features=avx512[:-1]))
    other_torch = replace(amx, versions={**m.versions, "torch": "2.14.0"})
    names = [default_build_name(x) for x in (amx, no_amx, explicit, other_torch)]
    assert len(set(names)) == 4, names
    assert all(n.startswith("cpu-x86_64-avx512-float32-") for n in names), names
    # The name is a function of what a host needs: the same requirements, the same folder.
    assert default_build_name(replace(amx, source={**m.source, "model": "another"})) == names[0]


def test_push_refuses_to_replace_another_hosts_build_unless_told(hub, artifacts, tmp_path):
    home = tmp_path / "publisher"
    fits = artifacts("sd")
    name = default_build_name(read_manifest(fits))
    _push(hub, home, fits, "tester/replace")
    head = hub.head("tester/replace")
    other = _foreign(Path(shutil.copytree(fits, tmp_path / "other-torch")), "2.99.0")
    proc = _cli(hub, home, "push", str(other), "tester/replace", "--build", name)
    assert proc.returncode == 1, proc.stderr
    assert (
        f"error: tester/replace@main: build {name!r} holds a build for another host (torch: "
        f"'{torch.__version__}' there, '2.99.0' here); pushing would replace it, and the hosts it serves would "
        "lose it: push under another --build, or pass --replace to replace it; nothing was committed"
    ) in proc.stderr
    assert hub.head("tester/replace") == head
    assert _push(hub, home, other, "tester/replace", "--build", name, "--replace") != head
    assert json.loads(hub.files("tester/replace")[f"{name}/{MANIFEST_FILE}"])["versions"]["torch"] == "2.99.0"


def test_push_to_a_branch_of_a_new_private_repo(hub, artifacts, tmp_path):
    home = tmp_path / "publisher"
    proc = _cli(hub, home, "push", str(artifacts("sd")), "tester/private", "--private", "--branch", "release")
    assert proc.returncode == 0, proc.stderr
    sha = proc.stdout.strip().splitlines()[-1]
    assert hub.head("tester/private", "release") == sha
    assert hub.files("tester/private", "main") == {}  # main keeps its initial commit only
    # Private: invisible without a token (the Hub answers as for a missing repo), readable with one.
    anonymous = _load(hub, tmp_path / "anon", repo="tester/private", revision=sha, trust=True, HF_TOKEN="")
    assert anonymous["error"] == "ArtifactNotFoundError"
    assert "no such repo" in anonymous["message"] and "private and no valid token" in anonymous["message"]


def test_generate_from_a_repo_id(hub, pushed, tmp_path):
    out = tmp_path / "cat.png"
    args = ["generate", REPO, "--prompt", PROMPT, "--steps", "2", "--out", str(out)]
    refused = _cli(hub, tmp_path, *args)
    assert refused.returncode == 1 and "trust_remote_code=True" in refused.stderr
    proc = _cli(hub, tmp_path, *args, "--revision", pushed["sha"], "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.stat().st_size > 0


def test_an_artifact_uploaded_as_the_whole_repo_loads_as_one_build(hub, hub_artifact, tmp_path):
    manifest = read_manifest(hub_artifact)
    hub.create_repo("tester/whole")
    sha = hub.commit(
        "tester/whole", {rel: (hub_artifact / rel).read_bytes() for rel in [MANIFEST_FILE, *manifest.files]}
    )
    got = _load(hub, tmp_path, repo="tester/whole", revision=sha, trust=True)
    assert "error" not in got, got
    assert Path(got["root"]) == tmp_path / "diffbake-hub" / "models--tester--whole" / sha / "_root"


def test_a_class_label_pipeline_round_trips_through_the_hub(hub, artifacts, tmp_path):
    # A DiT artifact (class labels, no text): pushed, pulled on another host, same images as the local one.
    artifact = artifacts("dit")
    sha = _push(hub, tmp_path / "pusher", artifact, "tester/tiny-dit")
    out = tmp_path / "pulled"
    proc = _cli(hub, tmp_path / "server", "pull", "tester/tiny-dit", "--revision", sha, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(out) == read_manifest(artifact)

    def images(folder: Path) -> np.ndarray:
        pipe = diffbake.load(folder)
        return pipe(
            class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    np.testing.assert_array_equal(images(out), images(artifact))


def test_serve_a_pinned_hub_revision(hub, pushed, tmp_path):
    import signal

    from servers import free_port, server_process

    port = free_port()
    home = tmp_path / "server-host"
    # Without the opt-in the server does not start: the build is native code.
    refused = _cli(hub, home, "serve", REPO, "--revision", pushed["sha"], "--port", str(port))
    assert refused.returncode == 1
    assert "cannot be served: TrustError: " in refused.stderr and "trust_remote_code=True" in refused.stderr
    cmd = [sys.executable, "-m", "diffbake.cli", "serve", REPO, "--revision", pushed["sha"], "--trust-remote-code"]
    with server_process([*cmd, "--port", str(port)], port, env=_env(hub, home)) as (proc, client):
        assert client.get("/v1/models").json()["data"][0]["id"] == REPO
        response = client.post("/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 2})
        assert response.status_code == 200 and len(response.json()["data"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
