"""``diffbake.load``: an artifact (a folder or a pinned Hub build) back into a working diffusers pipeline, with no
compile step. Everything that can be checked is checked before the first compiled library is loaded.

This module, like the rest of the runtime package, imports nothing from the build side (export, inductor's compiler, click).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffbake.errors import ArtifactError, ArtifactNotFoundError
from diffbake.format.components import (
    COMPONENTS,
    VAE_DECODER,
    area_call,
    bins_resolution,
    fitting_guidance,
)
from diffbake.format.host import check_compatibility, emulated_half_warning
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import (
    Manifest,
    read_manifest,
)
from diffbake.format.packages import inspect_package
from diffbake.hub.fetch import check_remote, fetch, is_repo_id
from diffbake.runtime.caches import enable_recorded_step_cache
from diffbake.runtime.compiled import CompiledComponent, LoadedArtifact
from diffbake.runtime.guards import resolve_device, torch_dtype
from diffbake.runtime.packages import unpack_dir as resolve_unpack_dir
from diffbake.runtime.regional import load_regional
from diffbake.runtime.selftest import run_self_test
from diffbake.runtime.standins import CompiledModel, make_stand_in

logger = logging.getLogger(__name__)


def load_component(
    artifact: str | Path,
    manifest: Manifest,
    name: str,
    device: str | None = None,
    unpack: Path | None = None,
    concurrency: int = 1,
    cuda_graphs: bool = False,
) -> torch.nn.Module:
    """The stand-in module holding component ``name`` and the other compiled components of the same pipeline
    attribute (no checks of files or host; :func:`load` does those)."""
    attribute = COMPONENTS[name].attribute
    return load_modules(artifact, manifest, device, unpack, concurrency, cuda_graphs, only=attribute)[attribute]


def load_modules(
    artifact: str | Path,
    manifest: Manifest,
    device: str | None = None,
    unpack: Path | None = None,
    concurrency: int = 1,
    cuda_graphs: bool = False,
    only: str | None = None,
) -> dict[str, torch.nn.Module]:
    """Pipeline attribute -> the module that stands there: one stand-in per attribute, carrying every compiled
    component of it (the VAE's decoder and encoder), or the eager module with regional blocks."""
    artifact = Path(artifact)
    device = device or manifest.device
    by_attribute: dict[str, list[Any]] = {}
    for entry in manifest.components.values():
        by_attribute.setdefault(COMPONENTS[entry.name].attribute, []).append(entry)
    modules: dict[str, torch.nn.Module] = {}
    for attribute, entries in by_attribute.items():
        if only is not None and attribute != only:
            continue
        if entries[0].mode == "regional":  # the build compiles a regional component alone in its attribute
            if cuda_graphs:
                logger.info("%s: regional blocks run without CUDA graphs", entries[0].name)
            modules[attribute] = load_regional(artifact, entries[0], device, unpack, concurrency)
            continue
        config = _read_config(artifact / entries[0].config)
        programs = {e.name: CompiledComponent(artifact, e, device, unpack, concurrency, cuda_graphs) for e in entries}
        modules[attribute] = make_stand_in(programs, config, entries)
    return modules


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: not a JSON config ({type(e).__name__}); rebuild the artifact") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: not a JSON object; rebuild the artifact")
    return config


def load(
    artifact: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    build: str | None = None,
    device: str | None = None,
    verify: str | None = None,
    self_test: bool = False,
    unpack_dir: str | Path | None = None,
    progress: Callable[[str, str], None] | None = None,
    concurrency: int = 1,
    cuda_graphs: bool = False,
):
    """Load an artifact as a diffusers pipeline whose denoiser and VAE decoder run the compiled code.

    Everything that can be checked is checked before the first compiled library is loaded, in this order: the
    manifest (strict schema), the host (torch, device, CUDA, GPU, CPU instruction sets, platform), every file
    (size and sha256, nothing unlisted) and every package (an allow-list of entries: no sources, no pickles).

    Args:
        artifact: the artifact folder written by ``diffbake build``, or a Hub repo id ("org/name") that
            ``diffbake push`` wrote to; a local folder of that name wins.
        revision: for a Hub repo, the commit sha to load (a branch or tag is refused: it can move).
        trust_remote_code: must be True for a Hub repo: its builds are native code that runs in this process.
        build: for a Hub repo, the build folder to use; by default the one that fits this host (a GPU build
            first, then the CPU build using most of this CPU's instruction sets).
        device: where to run; defaults to the device the artifact was built for ("cpu" or "cuda[:N]").
        verify: "full" hashes every file; "stamp" skips the hashing if a stamp recorded by an earlier full
            verification on this host still matches every file's size, mtime, ctime and inode. The default is
            "full" for a local folder and "stamp" for a Hub build, whose files are hashed once, when fetched.
        self_test: replay the call recorded at build on each compiled variant and compare the output.
        unpack_dir: where packages are extracted before loading; default $DIFFBAKE_UNPACK_DIR, else the
            temporary folder. It must allow executing programs (not mounted noexec).
        progress: called with (stage, detail) as each check passes; by default they are logged.
        concurrency: how many denoiser (and VAE) calls may run at once, from pipelines made with
            :func:`replicate`; each extra runner costs activation memory only, never a weight copy.
        cuda_graphs: on a CUDA artifact, replay each static-shape variant as a CUDA graph (captured on the
            second call at a shape, checked against an uncaptured run); dynamic-shape variants and regional
            blocks run as they are. Needs ``concurrency=1``: a graph replays into one set of buffers.

    Returns:
        A ``diffusers.DiffusionPipeline`` (e.g. ``StableDiffusionPipeline``), used as usual:
        ``pipe(prompt, num_inference_steps=..., generator=...)``.

    Raises:
        TrustError: a Hub repo without ``trust_remote_code=True`` or without a pinned commit sha; nothing was
            requested from the Hub.
        ArtifactNotFoundError: no artifact at that path, no such repo or commit, or (HF_HUB_OFFLINE=1) not cached.
        HubError: the Hub failed a request.
        ArtifactError: the artifact is malformed, a file differs from its manifest (IntegrityError), or the
            self-test failed (SelfTestError).
        CompatibilityError: the artifact (for a Hub repo: every build, each listed with its reason) was built
            for another device, torch, platform or CPU, or the unpack folder cannot hold executable code.
    """
    start = time.perf_counter()
    report = progress or (lambda stage, detail: logger.info("%s: %s", stage, detail))
    _check_options(verify, concurrency, cuda_graphs)
    root, verify = _resolve(artifact, revision, trust_remote_code, build, device, verify, report)
    manifest, device, unpack = _check_before_native_code(root, device, verify, unpack_dir, cuda_graphs, report)
    modules = load_modules(root, manifest, device, unpack, concurrency, cuda_graphs)
    report("weights", f"{sum(len(c.constants) for c in manifest.components.values())} tensors bound and checked")
    if self_test:
        for line in run_self_test(root, manifest, modules):
            report("self-test", line)
    pipe = _assemble(root, manifest, modules, device)
    enable_recorded_step_cache(pipe, manifest)
    report("pipeline", f"{manifest.pipeline_class} loaded in {time.perf_counter() - start:.2f} s")
    return pipe


def _check_options(verify: str | None, concurrency: int, cuda_graphs: bool) -> None:
    if verify not in (None, "full", "stamp"):
        raise ValueError(f"verify must be 'full' or 'stamp', not {verify!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, not {concurrency!r}")
    if cuda_graphs and concurrency != 1:
        raise ValueError(
            f"cuda_graphs=True needs concurrency=1 (found {concurrency}): a captured graph replays into one set of "
            "buffers, so concurrent calls would overwrite each other's results"
        )


def _resolve(
    artifact: str | Path,
    revision: str | None,
    trust_remote_code: bool,
    build: str | None,
    device: str | None,
    verify: str | None,
    report: Callable[[str, str], None],
) -> tuple[Path, str]:
    """The local artifact folder (a Hub build is fetched into one first), and how its files are verified."""
    if is_repo_id(artifact):
        check_remote(str(artifact), revision, trust_remote_code=trust_remote_code)
        root, _ = fetch(str(artifact), revision, device=device, build=build, progress=report)
        # A fetched build was hashed once, as it was fetched; its stamp stands for that.
        return root, verify or "stamp"
    if revision is not None or build is not None:
        raise ValueError(
            f"{artifact}: revision= and build= apply to Hub repo ids; this is a local path, loaded as it is"
        )
    root = Path(artifact)
    if not root.exists():
        raise ArtifactNotFoundError(f"{root}: no such artifact folder; build one with `diffbake build RECIPE`")
    return root, verify or "full"


def _check_before_native_code(
    root: Path,
    device: str | None,
    verify: str,
    unpack_dir: str | Path | None,
    cuda_graphs: bool,
    report: Callable[[str, str], None],
) -> tuple[Manifest, str, Path]:
    """Every check that can run before a compiled library is loaded: manifest, host, files, packages."""
    manifest = read_manifest(root)
    report("manifest", f"format {manifest.format_version}, {manifest.pipeline_class}, {len(manifest.files)} files")
    device = resolve_device(device or manifest.device)
    check_compatibility(manifest, device)
    if cuda_graphs and manifest.device != "cuda":
        raise ValueError(
            f"{root}: cuda_graphs=True applies to CUDA artifacts; this one was built for {manifest.device!r}"
        )
    unpack = resolve_unpack_dir(unpack_dir)
    report("host", f"{device}, torch {torch.__version__}, cpu_isa {manifest.host.cpu_isa}, unpack into {unpack}")
    slow = emulated_half_warning(manifest.dtype) if manifest.device == "cpu" else None
    if slow is not None:
        logger.warning("%s: %s", root, slow)
    how = verify_files(root, manifest, use_stamp=verify == "stamp")
    total = sum(f.size for f in manifest.files.values())
    checked = "stamp matched" if how == "stamp" else "sha256 checked"
    report("files", f"{len(manifest.files)} files, {total / 1e6:.1f} MB, {checked}")
    packages = package_paths(manifest)
    for entry in manifest.components.values():
        for package in entry.packages:
            info = inspect_package(root / package, manifest.device, platform.machine())
            # A code-only package run unbound, or bound over weights of its own, would crash or compute garbage.
            if info.weights is not None and not entry.frozen:
                raise ArtifactError(
                    f"{root / package}: the package holds its own weights, but the manifest binds {entry.name}'s "
                    f"from {entry.weights} (no compiler freezing); rebuild the artifact"
                )
            if info.weights is None and entry.frozen:
                raise ArtifactError(
                    f"{root / package}: the package holds no weights, but the manifest says {entry.name} was built "
                    "with compiler freezing, which puts them there; rebuild the artifact"
                )
    report("packages", f"{len(packages)} inspected: one library each, no sources, no pickles")
    return manifest, device, unpack


def _assemble(root: Path, manifest: Manifest, modules: dict[str, torch.nn.Module], device: str) -> Any:
    """The diffusers pipeline: the eager components from the artifact, the compiled ones in their places."""
    import diffusers

    record = LoadedArtifact(root, manifest, device)
    pipeline_cls = getattr(diffusers, manifest.pipeline_class)
    # The guards see sizes after the pipeline's resolution binning, which a call's height and width may not show.
    note = (
        f"{pipeline_cls.__name__} rounds height and width to the nearest size of its resolution table before its "
        "models see them, unless called with use_resolution_binning=False: the shapes above are after any rounding"
        if bins_resolution(pipeline_cls)
        else None
    )
    for module in modules.values():
        for component in module.diffbake_components.values():
            component.loaded_from = record
            # Full-graph components; a regional build's blocks refuse a call with a message of their own.
            if isinstance(component, CompiledComponent):
                component.call_note = note
    overrides = dict(modules)
    with _stand_ins_accepted():
        # use_safetensors: the eager components load from safetensors only, never from pickled checkpoints.
        pipe = pipeline_cls.from_pretrained(
            root / manifest.pipeline, dtype=torch_dtype(manifest.dtype), use_safetensors=True, **overrides
        )
    pipe.to(device)
    _set_default_size(pipe, manifest.denoiser, manifest)
    return pipe


def compiled_call(manifest: Manifest) -> dict[str, Any]:
    """Pipeline-call keyword arguments that fit what was compiled: the size and images per call of the
    denoiser's first variant (the VAE's if only it is compiled), at the low end of a dynamic range; no guidance
    where the pipeline would run a CFG batch that was not compiled, and guidance where it would not run one that
    was (never a guidance value otherwise: Flux-dev's guidance embedding takes it as an input)."""
    entry = manifest.components.get(manifest.denoiser or "") or manifest.components[VAE_DECODER]
    variant = entry.variants[0]
    low = {k: (v[0] if isinstance(v, list) else v) for k, v in variant.shapes.items()}
    import diffusers

    pipeline = getattr(diffusers, manifest.pipeline_class)
    params = inspect.signature(pipeline.__call__).parameters
    kwargs: dict[str, Any] = {k: low[k] for k in ("height", "width") if k in params}
    if "num_images_per_prompt" in params:
        kwargs["num_images_per_prompt"] = low["batch"]
    elif "batch_size" in params:
        kwargs["batch_size"] = low["batch"]
    if low.get("text_tokens"):
        kwargs["max_sequence_length"] = low["text_tokens"]
    if "height" in kwargs:
        kwargs.update(area_call(pipeline, kwargs["height"], kwargs["width"]))
    guidance = fitting_guidance([variant.cfg], pipeline)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


def package_paths(manifest: Manifest) -> list[str]:
    """Every compiled package an artifact holds, relative to its folder."""
    return [package for entry in manifest.components.values() for package in entry.packages]


class _DropStandInTypeWarnings(logging.Filter):
    # The pipeline's constructor warns that a stand-in is not the annotated eager class; that is the point of it.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for") and "diffbake.runtime.standins.Compiled" in message)


@contextlib.contextmanager
def _stand_ins_accepted() -> Iterator[None]:
    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    quiet = _DropStandInTypeWarnings()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _set_default_size(pipe: Any, denoiser: str | None, manifest: Manifest) -> None:
    # A bare pipe(prompt) should ask for the compiled size, not the model's native one.
    entry = manifest.components.get(denoiser or "")
    shapes = entry.variants[0].shapes if entry is not None else {}
    if not isinstance(shapes.get("height"), int) or shapes["height"] != shapes["width"]:
        return
    latent = shapes["height"] // getattr(pipe, "vae_scale_factor", 1)
    if hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = latent
    module = getattr(pipe, denoiser)
    # PixArt's and SANA's resolution binning picks its table of sizes by the denoiser's sample_size: changing it
    # would change what every call computes, so those pipelines keep stock diffusers' default size and binning.
    if isinstance(module, CompiledModel) and "sample_size" in module.config and not bins_resolution(type(pipe)):
        module.register_to_config(sample_size=latent)
