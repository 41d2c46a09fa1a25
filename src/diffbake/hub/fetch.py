"""Artifacts on the Hugging Face Hub: pick the build that fits this host, fetch it once, load it from then on.

A repo holds one or more builds, each a complete artifact in its own folder (``cpu-x86_64-avx512-float32-1a2b3c4d/``,
``cuda-sm90-bfloat16/`` ...), so one repo can serve a fleet of different machines. A build contains native code
that runs in the loading process, so a remote artifact is fetched for loading only with ``trust_remote_code=True``
and a pinned commit sha; both are checked before any request is made.

Files go through huggingface_hub's own cache, so ``HF_HOME``, ``HF_HUB_OFFLINE``, tokens and mirrors work as
usual. The chosen build's files are then linked (or copied, across file systems) into a folder of regular files,
hashed against the manifest once, when fetched, and stamped; later loads check the stamp instead of hashing again
(see :func:`diffbake.format.integrity.verify_files`). That folder is a plain artifact: everything the loader checks on a local
artifact it checks on a fetched one.

This module is on the runtime side: it imports nothing from the build side.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbake.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    CompatibilityError,
    HubError,
    IntegrityError,
    TrustError,
)
from diffbake.format.host import cache_folder, check_compatibility
from diffbake.format.integrity import record_stamp, verify_files
from diffbake.format.manifest import MANIFEST_FILE, Manifest, parse_manifest, sealed

logger = logging.getLogger(__name__)

# A Hub repo id ("org/name"); a local path of the same form wins if it exists.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
# A build's folder in a repo: one path component, no dots first (no ".", "..", hidden folders).
BUILD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
CACHE_ENV = "DIFFBAKE_HUB_CACHE"
# The name of a build that is the whole repo (manifest.json at its root), as an uploaded artifact folder is.
ROOT_BUILD = "_root"  # not a name a push can give (those start with a letter or digit)

Progress = Callable[[str, str], None]


def is_repo_id(value: str | os.PathLike) -> bool:
    return isinstance(value, str) and REPO_ID.fullmatch(value) is not None and not Path(value).exists()


def check_remote(repo_id: str, revision: str | None, *, trust_remote_code: bool) -> None:
    """Refuse a remote artifact without the opt-in and a pinned commit, before anything is requested.

    Raises:
        TrustError: saying which is missing and how to give it.
    """
    if not trust_remote_code:
        raise TrustError(
            f"{repo_id}: no local artifact folder of that name, and a Hub artifact contains native code (compiled "
            "libraries that run in this process); load one only from a publisher you trust, with "
            f"diffbake.load({repo_id!r}, revision='<commit sha>', trust_remote_code=True)"
        )
    check_pinned(repo_id, revision)


def check_pinned(repo_id: str, revision: str | None) -> None:
    """A branch or tag can move to other code after it was reviewed; a commit sha cannot.

    Raises:
        TrustError: the revision is not a full commit sha.
    """
    if revision is None or not COMMIT.fullmatch(revision):
        found = "no revision" if revision is None else f"revision {revision!r}"
        raise TrustError(
            f"{repo_id}: {found}, but a Hub artifact is fetched only at a pinned commit (40 lowercase hex "
            "characters), so that the code you reviewed is the code you run; pass the commit sha that "
            "`diffbake push` printed (or one from the repo's history) as revision"
        )


@dataclass(frozen=True)
class Build:
    """One artifact folder of a repo, and why it cannot be used here (None: it fits)."""

    name: str
    manifest: Manifest | None
    problem: str | None

    def describe(self) -> str:
        m = self.manifest
        if m is None:
            return self.name
        what = (
            m.host.device
            if m.host.device != "cuda"
            else f"cuda sm{(m.host.compute_capability or '?').replace('.', '')}"
        )
        if m.host.device == "cpu":
            what += f" {m.host.machine} {m.host.cpu_isa}"
        return f"{self.name} ({what}, {m.dtype}, torch {m.versions.get('torch', '?')})"


def list_builds(repo_id: str, revision: str, *, device: str | None = None) -> list[Build]:
    """Every build in the repo at ``revision``, each checked against this host (only manifests are fetched).

    Raises:
        ArtifactNotFoundError: no such repo or commit, no build in it, or (offline) none cached.
        HubError: the Hub failed the request.
    """
    snapshot = _snapshot(repo_id, revision, [MANIFEST_FILE, f"*/{MANIFEST_FILE}"])
    builds = []
    if (snapshot / MANIFEST_FILE).is_file():  # an artifact uploaded as the whole repo: one build, at the root
        builds.append(_check_build(repo_id, revision, ROOT_BUILD, snapshot / MANIFEST_FILE, device))
    for path in sorted(snapshot.glob(f"*/{MANIFEST_FILE}")):
        builds.append(_check_build(repo_id, revision, path.parent.name, path, device))
    if not builds:
        raise ArtifactNotFoundError(
            f"{_where(repo_id, revision)}: no diffbake build in this repo (no <build>/{MANIFEST_FILE}); "
            "push one with `diffbake push ARTIFACT REPO_ID`"
        )
    return builds


def choose_build(
    repo_id: str, revision: str, builds: list[Build], *, build: str | None = None, must_fit: bool = True
) -> Build:
    """The named build, or else the one that fits this host best: a GPU build before a CPU one, and among CPU
    builds the one that uses the most of this CPU's instruction sets.

    Raises:
        ArtifactNotFoundError: the named build is not in the repo.
        CompatibilityError: it (or, unnamed, every build) does not fit; every build is listed with its reason.
    """
    listing = "\n".join(f"  - {b.describe()}: {b.problem or 'fits this host'}" for b in builds)
    if build is not None:
        chosen = [b for b in builds if b.name == build]
        if not chosen:
            raise ArtifactNotFoundError(
                f"{_where(repo_id, revision)}: no build named {build!r}; the repo holds:\n{listing}"
            )
        if chosen[0].problem is not None and (must_fit or chosen[0].manifest is None):
            raise CompatibilityError(
                f"{_where(repo_id, revision)}: build {chosen[0].describe()} does not fit this host: {chosen[0].problem}"
            )
        return chosen[0]
    fitting = [b for b in builds if b.problem is None]
    if not fitting:
        raise CompatibilityError(
            f"{_where(repo_id, revision)}: none of its {len(builds)} build(s) fits this host:\n{listing}\n"
            "build the recipe on (or for) this host and push it to the same repo with "
            f"`diffbake push ARTIFACT {repo_id}`"
        )

    def rank(b: Build) -> tuple:
        host = b.manifest.host  # type: ignore[union-attr]
        return (host.device != "cuda", -len(host.cpu_features), b.name)

    return min(fitting, key=rank)


def fetch(
    repo_id: str,
    revision: str,
    *,
    device: str | None = None,
    build: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    must_fit: bool = True,
    progress: Progress | None = None,
) -> tuple[Path, Build]:
    """Fetch the build of ``repo_id`` at commit ``revision`` that fits this host into a folder of regular files,
    hashed against its manifest. Without ``out`` the folder is diffbake's Hub cache ($DIFFBAKE_HUB_CACHE, else
    ~/.cache/diffbake/hub) and a build fetched before is reused (checked by its stamp); with ``out`` it is that folder.

    The revision must be a commit sha (:func:`check_pinned`); trust is the caller's to check (``load`` asks for
    ``trust_remote_code``; ``diffbake pull`` only stages files). A build named with ``build`` is fetched even if
    it does not fit this host when ``must_fit`` is false (staging for other hosts); its problem is reported.

    Returns:
        The artifact folder and the build it holds.
    """
    report = progress or (lambda stage, detail: logger.info("%s: %s", stage, detail))
    check_pinned(repo_id, revision)
    try:
        builds = list_builds(repo_id, revision, device=device)
    except _NotCached as e:
        # Offline, and huggingface_hub's cache lacks the manifests (e.g. it was cleared): builds fetched into
        # diffbake's cache before still serve.
        builds = _fetched_builds(repo_id, revision, device) if out is None else []
        if not builds:
            raise ArtifactNotFoundError(str(e)) from None
    chosen = choose_build(repo_id, revision, builds, build=build, must_fit=must_fit)
    manifest = chosen.manifest
    assert manifest is not None
    report("hub", f"{_where(repo_id, revision)}: {len(builds)} build(s), using {chosen.describe()}")
    if chosen.problem is not None:
        report("hub", f"note: {chosen.name} does not fit this host ({chosen.problem}); fetched for another host")
    dest = Path(out) if out is not None else cache_dir() / _repo_folder(repo_id) / revision / chosen.name
    if _already_there(dest, repo_id, revision, chosen):
        report("hub", f"{dest}: fetched before, stamp matches")
        return dest, chosen
    if out is not None and dest.exists() and not force:
        raise ArtifactError(
            f"{dest}: already exists and holds something else; pass --force to replace it, or pick another --out"
        )
    prefix = "" if chosen.name == ROOT_BUILD else f"{chosen.name}/"
    names = [f"{prefix}{rel}" for rel in [MANIFEST_FILE, *manifest.files]]
    total = sum(f.size for f in manifest.files.values())
    report("hub", f"downloading {len(names)} files, {total / 1e6:.1f} MB")
    try:
        snapshot = _snapshot(repo_id, revision, [glob.escape(name) for name in names])
    except _NotCached as e:  # offline, with the manifests cached but not this build's files
        raise ArtifactNotFoundError(str(e)) from None
    from diffbake.format.staging import (
        Staging,  # only when fetching: a local load imports none of the artifact-writing code
    )

    with Staging(dest) as staging:
        for name in names:
            src = snapshot / name
            rel = name.removeprefix(prefix)
            if not src.is_file():
                raise IntegrityError(
                    f"{_where(repo_id, revision)}: {name} is listed in the build's manifest but not in the repo; the "
                    "build was pushed incomplete; push it again with `diffbake push`"
                )
            target = staging.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src.resolve(), target)
        try:
            verify_files(staging.path, manifest, record=False)
        except IntegrityError as e:
            raise IntegrityError(
                f"{_where(repo_id, revision)}: build {chosen.name} differs from its manifest ({e}); delete the repo "
                "from the Hugging Face cache (`hf cache delete`) and fetch it again; if it persists, the repo's "
                "files were changed after the build: push the build again"
            ) from None
        staging.commit()
    record_stamp(dest, manifest)
    report("hub", f"{dest}: {len(names)} files hashed against the manifest")
    return dest, chosen


def cache_dir() -> Path:
    return cache_folder(CACHE_ENV, "hub")


def _where(repo_id: str, revision: str) -> str:
    return f"{repo_id}@{revision[:12]}"


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _already_there(dest: Path, repo_id: str, revision: str, build: Build) -> bool:
    # The same manifest bytes as the repo's, and files whose stamp (or, without one, hashes) match it.
    path = dest / MANIFEST_FILE
    if not path.is_file() or path.is_symlink():
        return False
    try:
        manifest = parse_manifest(path.read_bytes(), path)
        if manifest != build.manifest:
            return False
        verify_files(dest, manifest, use_stamp=True)
    except (ArtifactError, OSError) as e:
        logger.warning("%s: fetching %s again: %s", dest, _where(repo_id, revision), e)
        return False
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    # The cache's blobs are immutable and named by content, so a hard link shares them with no second copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _fetched_builds(repo_id: str, revision: str, device: str | None) -> list[Build]:
    folder = cache_dir() / _repo_folder(repo_id) / revision
    paths = sorted(folder.glob(f"*/{MANIFEST_FILE}")) if folder.is_dir() else []
    return [_check_build(repo_id, revision, path.parent.name, path, device) for path in paths]


class _NotCached(ArtifactNotFoundError):
    """Offline, and the files asked for are not in huggingface_hub's cache."""


def _check_build(repo_id: str, revision: str, name: str, path: Path, device: str | None) -> Build:
    where = f"{_where(repo_id, revision)}/{name}/{MANIFEST_FILE}"
    if name != ROOT_BUILD and not BUILD_NAME.fullmatch(name):
        return Build(name, None, "not a build folder name diffbake writes")
    try:
        raw = path.read_bytes()
        manifest = parse_manifest(raw, where)
    except (ArtifactError, OSError) as e:
        return Build(name, None, str(e))
    if not sealed(raw):
        return Build(
            name, manifest, "its manifest does not match the digest it was sealed with (changed after the build)"
        )
    import torch

    wanted = torch.device(device).type if device is not None else manifest.device
    try:
        check_compatibility(manifest, wanted)
    except CompatibilityError as e:
        return Build(name, manifest, str(e))
    return Build(name, manifest, None)


def _snapshot(repo_id: str, revision: str, patterns: list[str]) -> Path:
    """``snapshot_download`` of the files matching ``patterns``, with huggingface_hub's errors made diffbake's."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(repo_id, revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError as e:
        raise HubError(
            f"{where}: the repo is gated; accept its terms on the Hub and log in (`hf auth login`): {_first(e)}"
        ) from None
    except RepositoryNotFoundError:
        raise ArtifactNotFoundError(
            f"{repo_id}: no such repo on {constants.ENDPOINT}, or it is private and no valid token was given "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ArtifactNotFoundError(
            f"{where}: the repo has no commit {revision}; check the sha `diffbake push` printed"
        ) from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise _NotCached(
                f"{where}: not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it; fetch it once online "
                f"(`diffbake pull {repo_id} --revision {revision}`, or a first load) and load it offline after"
            ) from None
        raise HubError(
            f"{where}: cannot reach {constants.ENDPOINT} and the files are not cached: {_first(e)}"
        ) from None
    except HfHubHTTPError as e:
        raise HubError(f"{where}: the Hub refused the download: {_first(e)}") from None


def _first(e: Any) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
