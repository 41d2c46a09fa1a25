"""Publishing an artifact to the Hugging Face Hub: one build per folder, everything in one commit.

A push verifies the artifact, then writes it into its build folder of the repo (``cpu-x86_64-avx512-float32-1a2b3c4d/``
by default: device, hardware, dtype and a digest of what a host needs, so builds for different hosts sit side by side) together with a
model card that describes every build in the repo, in a single ``create_commit`` whose parent is the commit the
push started from. huggingface_hub uploads the large files first and makes the commit last, so a push that fails
midway commits nothing, and one that races another push is refused instead of mixing the two. The commit sha is
returned for pinning: loaders accept nothing else (see :mod:`diffbake.hub.fetch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbake.errors import ArtifactError, HubError
from diffbake.format.host import requirements
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import MANIFEST_FILE, RECIPE_FILE, Manifest, parse_manifest, read_manifest
from diffbake.hub.fetch import BUILD_NAME, REPO_ID

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    build: str
    commit: str  # the sha to pin
    url: str
    files: int
    bytes: int


def default_build_name(manifest: Manifest) -> str:
    """``cpu-x86_64-avx2-float32-1a2b3c4d``, ``cuda-sm90-bfloat16-5e6f7a8b``: what a build runs on, then a digest
    of everything a host must match (torch, CUDA, GPU architecture, each CPU extension: see
    :func:`~diffbake.format.host.requirements`) and the dtype. Builds that need different hosts get different
    folders even where the readable part is the same (AMX and non-AMX hosts, two torch versions, a native and an
    explicit avx512 build)."""
    host = manifest.host
    if host.device == "cuda":
        where = f"cuda-sm{(host.compute_capability or 'unknown').replace('.', '')}"
    else:
        isa = host.cpu_isa if host.cpu_isa != "native" else host.cpu_capability.lower().replace(" ", "")
        where = f"{host.device}-{host.machine}-{isa or 'native'}"
    return f"{where}-{manifest.dtype}-{_requirements_digest(manifest)}"


def _requirements_digest(manifest: Manifest) -> str:
    facts = {**requirements(manifest), "dtype": manifest.dtype}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:8]


def push(
    artifact: str | Path,
    repo_id: str,
    *,
    build: str | None = None,
    private: bool = False,
    branch: str | None = None,
    message: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    replace: bool = False,
) -> PushResult:
    """Push ``artifact`` as build ``build`` of ``repo_id``; the build folder's previous content, if any, is replaced.

    A build folder that holds a build for another host (other torch, CUDA, GPU architecture, CPU extensions or
    dtype) is replaced only with ``replace=True``: a host that loaded it would otherwise silently get another
    build, or none.

    Raises:
        ArtifactError: the artifact is incomplete or differs from its manifest (nothing is pushed).
        ValueError: a malformed repo id or build name.
        HubError: the Hub refused or failed, or the build folder holds another host's build; nothing was committed.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    report = progress or (lambda stage, detail: logger.info("%s: %s", stage, detail))
    root = Path(artifact)
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{repo_id!r}: not a Hub repo id; expected 'namespace/name'")
    manifest = read_manifest(root)
    verify_files(root, manifest, use_stamp=True)
    name = build or default_build_name(manifest)
    if not BUILD_NAME.fullmatch(name):
        raise ValueError(
            f"build {name!r}: a build is one folder of the repo; use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    total = sum(f.size for f in manifest.files.values())
    report("artifact", f"{root}: {len(manifest.files)} files, {total / 1e6:.1f} MB, sha256 checked")

    api = HfApi(token=token)
    revision = branch or "main"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        parent = api.repo_info(repo_id, revision=revision).sha
        existing = api.list_repo_files(repo_id, revision=parent)
        others, recipes = _builds(api, repo_id, parent, existing)
    except HfHubHTTPError as e:
        raise HubError(f"{repo_id}: the Hub refused to prepare the push: {_first(e)}") from None
    previous = others.pop(name, None)
    recipes.pop(name, None)
    if previous is not None and not replace:
        _refuse_another_hosts_build(repo_id, revision, name, previous, manifest)
    assert parent is not None
    report("repo", f"{repo_id}@{revision} is at {parent[:12]}; {len(others)} other build(s) in it")

    license_ = _base_license(api, manifest)
    recipe = root / RECIPE_FILE
    recipes[name] = recipe.read_text(encoding="utf-8") if recipe.is_file() else None
    card = model_card(repo_id, {**others, name: manifest}, license_, recipes)
    new = {f"{name}/{rel}" for rel in [MANIFEST_FILE, *manifest.files]}
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=f"{name}/{rel}", path_or_fileobj=str(root / rel))
        for rel in [MANIFEST_FILE, *manifest.files]
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
    operations += [CommitOperationDelete(path_in_repo=p) for p in existing if p.startswith(f"{name}/") and p not in new]
    report("upload", f"{len(new)} files into {name}/, and the model card")
    try:
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message or f"diffbake: build {name}",
            commit_description=_commit_description(manifest),
            revision=revision,
            parent_commit=parent,
        )
    except Exception as e:  # noqa: BLE001 - whatever failed (HTTP, upload, connection), say what the repo holds now
        cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else None
        what = _first(e).rstrip(".") + (f": {_first(cause)}" if cause is not None else "")
        raise HubError(f"{repo_id}: the push failed ({what}); {_state_after(api, repo_id, revision, parent)}") from e
    report("commit", f"{info.oid}")
    return PushResult(repo_id, name, info.oid, str(url), len(new), total)


def _state_after(api: Any, repo_id: str, revision: str, parent: str) -> str:
    try:
        head = api.repo_info(repo_id, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - the Hub may be unreachable: then say so
        return f"could not read {revision} back ({_first(e)}); check the repo's history before pushing again"
    if head == parent:
        return (
            f"nothing was committed: {revision} is still at {parent[:12]}. Run it again (files the Hub already "
            "holds are not uploaded twice)"
        )
    return f"{revision} moved from {parent[:12]} to {head[:12]} meanwhile (another push?); run it again to build on it"


def model_card(
    repo_id: str, builds: dict[str, Manifest], license_: str | None, recipes: dict[str, str | None] | None = None
) -> str:
    """The repo's README.md: Hub metadata, then how to load it and what each build is."""
    from huggingface_hub import ModelCardData

    any_manifest = next(iter(builds.values()))
    source = any_manifest.source
    base_model = source.get("model") if source.get("kind") == "hub" else None
    tags = ["diffbake", "aot-compiled", "aotinductor", "diffusers", "text-to-image"]
    tags += sorted({m.host.device for m in builds.values()} | {m.pipeline_class for m in builds.values()})
    data = ModelCardData(
        library_name="diffbake",
        pipeline_tag="text-to-image",
        tags=tags,
        base_model=base_model,
        license=license_,
    )
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{source.get('model')}`"
    revision = source.get("revision")
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"Ahead-of-time compiled `{any_manifest.pipeline_class}` built with "
        "diffbake from "
        f"{origin}" + (f" at revision `{revision}`." if revision else "."),
        "The denoiser and VAE decoder are AOTInductor packages (native code); the weights are safetensors, "
        "stored once.",
        "",
        "## Load",
        "",
        "A build contains native code, so loading asks for an explicit opt-in and a pinned commit "
        "(this repo's commit sha):",
        "",
        "```python",
        "import diffbake",
        f'pipe = diffbake.load("{repo_id}", revision="<commit sha>", trust_remote_code=True)',
        "```",
        "",
        "The loader picks the build below that fits the host, checks every file's sha256 against its manifest, "
        "and refuses with a reason when none fits. To stage files on a host before serving:",
        "",
        "```bash",
        f"diffbake pull {repo_id} --revision <commit sha> --out artifacts/{repo_id.split('/')[-1]}",
        "```",
        "",
        "## Builds",
        "",
        "| build | device | hardware | dtype | torch | components | max error vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in sorted(builds.items()):
        lines.append(
            f"| `{name}` | {m.host.device} | {_hardware(m)} | {m.dtype} | {m.versions.get('torch', '?')} | "
            f"{', '.join(m.components)} | {_max_error(m):.2e} |"
        )
    for name, m in sorted(builds.items()):
        lines += ["", f"### `{name}`", ""] + _describe(m)
        recipe = (recipes or {}).get(name)
        if recipe:
            lines += ["", "<details><summary>Recipe</summary>", "", "```toml", recipe.rstrip(), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _describe(m: Manifest) -> list[str]:
    host = m.host
    lines = [
        f"- Source: `{m.source.get('model')}`" + (f" at `{m.source['revision']}`" if m.source.get("revision") else ""),
        f"- Built for: {m.host.device}, {_hardware(m)}, {host.platform} {host.machine}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
    ]
    if host.device == "cpu" and host.cpu_features:
        lines.append(f"- Needs CPU features: {' '.join(host.cpu_features)}")
    for name, c in m.components.items():
        transforms = ", ".join(f"{k}={v}" for k, v in c.transforms.items() if v not in (None, False, {}))
        compiler = ", ".join(f"{k}={v}" for k, v in c.compiler.items())
        lines.append(
            f"- `{name}` ({c.class_name}, {c.mode}): "
            + (f"transforms {transforms}; " if transforms else "")
            + (f"compiler {compiler}; " if compiler else "")
            + f"built in {c.build_seconds:.0f} s"
        )
        for v in c.variants:
            shapes = ", ".join(f"{k}={v}" for k, v in v.shapes.items())
            lines.append(
                f"  - {shapes}: max |compiled - eager| {v.max_abs_error:.2e} (tolerance {v.tolerance:.1e}), "
                f"vs float32 eager {v.error_vs_float32:.2e}"
            )
    return lines


def _hardware(m: Manifest) -> str:
    host = m.host
    if host.device == "cuda":
        return f"{host.gpu or 'GPU'} (sm {host.compute_capability}, CUDA {host.cuda})"
    return f"{host.machine} {host.cpu_isa}" + (f" ({host.cpu_capability})" if host.cpu_isa == "native" else "")


def _max_error(m: Manifest) -> float:
    return max((v.max_abs_error for c in m.components.values() for v in c.variants), default=0.0)


def _commit_description(m: Manifest) -> str:
    return (
        f"{m.pipeline_class} from {m.source.get('model')} ({m.source.get('revision') or 'no revision'}), "
        f"{m.host.device} {_hardware(m)}, {m.dtype}, torch {m.versions.get('torch')}"
    )


def _refuse_another_hosts_build(repo_id: str, revision: str, name: str, previous: Manifest, new: Manifest) -> None:
    was, now = {**requirements(previous), "dtype": previous.dtype}, {**requirements(new), "dtype": new.dtype}
    differences = [f"{k}: {was[k]!r} there, {now[k]!r} here" for k in was if was[k] != now[k]]
    if differences:
        raise HubError(
            f"{repo_id}@{revision}: build {name!r} holds a build for another host ({'; '.join(differences)}); "
            "pushing would replace it, and the hosts it serves would lose it: push under another --build, or "
            "pass --replace to replace it; nothing was committed"
        )


def _builds(
    api: Any, repo_id: str, parent: str, existing: list[str]
) -> tuple[dict[str, Manifest], dict[str, str | None]]:
    """The repo's builds (manifests and recipes), by folder."""
    from huggingface_hub import hf_hub_download

    manifests, recipes = {}, {}
    for path in existing:
        folder, _, rest = path.partition("/")
        if rest != MANIFEST_FILE:
            continue
        local = hf_hub_download(repo_id, path, revision=parent, token=api.token)
        try:
            manifests[folder] = parse_manifest(Path(local).read_bytes(), f"{repo_id}/{path}")
        except ArtifactError as e:
            logger.warning("the model card leaves out %s: %s", folder, e)
            continue
        recipe = f"{folder}/{RECIPE_FILE}"
        if recipe in existing:
            recipes[folder] = Path(hf_hub_download(repo_id, recipe, revision=parent, token=api.token)).read_text()
    return manifests, recipes


def _base_license(api: Any, manifest: Manifest) -> str | None:
    """The source model's license, from its Hub card; None where there is none (a local or built-in source)."""
    from huggingface_hub.errors import HfHubHTTPError

    source = manifest.source
    if source.get("kind") != "hub":
        return None
    try:
        info = api.model_info(source["model"], revision=source.get("revision"))
    except (HfHubHTTPError, OSError) as e:
        logger.warning("no license for %s in the model card: %s", source["model"], _first(e))
        return None
    card = info.card_data
    value = card.get("license") if card is not None else None
    return value if isinstance(value, str) else None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
