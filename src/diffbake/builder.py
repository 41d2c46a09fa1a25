"""build(recipe): the whole story of turning a diffusers pipeline into an artifact, top to bottom.

recipe ─► source configs ─► shape checks ─► load pipeline ─► per component:
    example inputs ─► eager reference ─► torch.export ─► AOTInductor ─► weights ─► verify vs eager
─► save the eager rest ─► manifest last ─► rename into place
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from . import __version__
from .aoti import compile_package
from .artifact import Staging
from .errors import BuildError, VerificationError
from .export import FlatCall, export_component
from .families import VAE_DECODER
from .inputs import component_inputs, example_inputs
from .manifest import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PACKAGE_FILE,
    PIPELINE_DIR,
    RECIPE_FILE,
    WEIGHTS_FILE,
    ComponentEntry,
    ConstantSpec,
    FileEntry,
    Manifest,
    TensorSpec,
)
from .recipe import ComponentRecipe, Recipe, check_against_source, load_recipe
from .runtime import CompiledProgram
from .sources import SourceInfo, inspect_source, load_module, load_pipeline
from .transforms import QUANT_TOLERANCES, channels_last, fuse_qkv, quantize, unwrap_for_export
from .verify import host_facts

logger = logging.getLogger(__name__)

# Max abs error allowed between compiled and eager output: atol + rtol * max|eager|, per dtype.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


class Reporter(Protocol):
    """Receives the build's stages; the CLI prints them, the library logs them."""

    def stage(self, title: str) -> ContextManager[None]: ...


class LogReporter:
    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("%s ...", title)
        yield
        logger.info("%s done in %.1f s", title, time.perf_counter() - start)


def build(
    recipe: Recipe | str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Build an artifact from a recipe.

    Args:
        recipe: a :class:`Recipe` or the path of a TOML recipe.
        out: the artifact folder; defaults to ``artifacts/<recipe name>``.
        force: replace an existing artifact at ``out`` (only once the new one is complete).
        reporter: receives each stage; defaults to logging.

    Returns:
        The artifact folder.

    Raises:
        RecipeError: the recipe is invalid, or does not fit the source model.
        SourceError: the source cannot be found or loaded.
        BuildError: export or compile failed, or the destination exists (without ``force``).
        VerificationError: compiled output differs from eager beyond the dtype's tolerance.
    """
    rep = reporter or LogReporter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    dest = Path(out) if out is not None else Path("artifacts") / recipe.name
    if dest.exists() and not force:
        raise BuildError(
            f"{dest}: already exists; pass --force to replace it (only once the new build is complete), or --out DIR"
        )

    with rep.stage("read source"):
        info = inspect_source(recipe)
        recipe = check_against_source(recipe, info.family, info.vae_scale_factor)
    with rep.stage(f"load {info.pipeline_class} ({recipe.dtype})"):
        pipe = load_pipeline(info, recipe.dtype)

    with Staging(dest) as staging:
        entries = {
            name: _build_component(comp, pipe, info, recipe, staging.path, rep)
            for name, comp in recipe.components.items()
        }
        with rep.stage("save the eager components"):
            skip = {"vae" if name == VAE_DECODER else name for name in entries}
            _save_pipeline(pipe, staging.path / PIPELINE_DIR, skip)
            (staging.path / RECIPE_FILE).write_text(recipe.text, encoding="utf-8")
        with rep.stage("write manifest"):
            staging.commit(lambda files: _manifest(recipe, info, entries, files))
    return dest


def _build_component(
    comp: ComponentRecipe, pipe: Any, info: SourceInfo, recipe: Recipe, root: Path, rep: Reporter
) -> ComponentEntry:
    name, family = comp.name, info.family
    start = time.perf_counter()
    attr = "vae" if name == VAE_DECODER else name
    method = "decode" if name == VAE_DECODER else "forward"
    module = getattr(pipe, attr)
    module.to(recipe.device).eval()
    specs = component_inputs(family, comp, pipe, recipe.dtype)
    example = [t.to(recipe.device) for t in example_inputs(family, specs)]
    names = [s.name for s in specs]

    with rep.stage(f"{name}: float32 eager reference"):
        # What every error is finally measured against: the untransformed component in float32.
        reference32 = _float32_reference(info, attr, method, names, example, module, comp, recipe)
    transforms = _apply_transforms(comp, module, rep)
    flat = FlatCall(module, method, names).eval()
    with torch.no_grad():
        reference = flat(*example)  # the eager component exactly as compiled: same dtype and transforms
    if comp.quantization is not None:
        unwrap_for_export(module)
    with rep.stage(f"{name}: export"):
        exported = export_component(name, flat, example)
    folder = root / name
    folder.mkdir()
    with rep.stage(f"{name}: compile (AOTInductor)"):
        compile_package(name, exported, folder / PACKAGE_FILE)
    with rep.stage(f"{name}: save weights"):
        constants = _save_weights(name, exported, folder)
        module.save_config(folder)

    rel = Path(name)
    output = TensorSpec("sample", list(reference.shape), str(reference.dtype).removeprefix("torch."))
    entry = ComponentEntry(
        name=name,
        class_name=type(module).__name__,
        package=(rel / PACKAGE_FILE).as_posix(),
        weights=(rel / WEIGHTS_FILE).as_posix(),
        config=(rel / CONFIG_FILE).as_posix(),
        shapes=comp.shapes.to_dict(),
        cfg=comp.cfg,
        inputs=specs,
        output=output,
        constants=constants,
        transforms=transforms,
        max_abs_error=0.0,
        tolerance=0.0,
        error_vs_float32=0.0,
        build_seconds=0.0,
    )
    with rep.stage(f"{name}: verify against eager"):
        # Run through the same loader and input guards the runtime uses: the build fails if loading would.
        compiled = CompiledProgram(root, entry, recipe.device)(example).float()
        error = (compiled - reference.float()).abs().max().item()
        error32 = (compiled - reference32).abs().max().item()
        atol, rtol = TOLERANCES[recipe.dtype]
        if comp.quantization is not None:
            q_atol, q_rtol = QUANT_TOLERANCES[comp.quantization.method]
            atol, rtol = max(atol, q_atol), max(rtol, q_rtol)
        tolerance = atol + rtol * reference.float().abs().max().item()
        del compiled
    if not math.isfinite(error) or error > tolerance:
        raise VerificationError(
            f"{name}: compiled output differs from eager by {error:.3g} (max abs), more than the {tolerance:.3g} "
            f"allowed for {_describe_build(recipe, comp)}; report it with DIFFBAKE_DEBUG=1 output, or try another "
            "dtype or quantization"
        )
    logger.info("%s: max abs error vs eager %.3g (tolerance %.3g), vs float32 %.3g", name, error, tolerance, error32)
    return replace(
        entry,
        max_abs_error=error,
        tolerance=tolerance,
        error_vs_float32=error32,
        build_seconds=round(time.perf_counter() - start, 2),
    )


def _describe_build(recipe: Recipe, comp: ComponentRecipe) -> str:
    return recipe.dtype + (f" with {comp.quantization.method}" if comp.quantization else "")


def _float32_reference(
    info: SourceInfo,
    attr: str,
    method: str,
    names: list[str],
    example: list[torch.Tensor],
    module: torch.nn.Module,
    comp: ComponentRecipe,
    recipe: Recipe,
) -> torch.Tensor:
    # A float32 build without transforms is its own reference; otherwise load the component alone in float32.
    own = recipe.dtype == "float32" and not comp.transformed
    module32 = module if own else load_module(info, attr, "float32").to(recipe.device).eval()
    inputs = [t.float() if t.is_floating_point() else t for t in example]
    with torch.no_grad():
        out = FlatCall(module32, method, names)(*inputs).float()
    del module32
    return out


def _apply_transforms(comp: ComponentRecipe, module: torch.nn.Module, rep: Reporter) -> dict[str, Any]:
    """fuse QKV -> channels_last -> quantize, in that order; returns what was applied, for the manifest."""
    done: dict[str, Any] = {"fuse_qkv": comp.fuse_qkv, "channels_last": comp.channels_last, "quantization": None}
    if comp.fuse_qkv:
        with rep.stage(f"{comp.name}: fuse QKV projections"):
            fuse_qkv(comp.name, module)
    if comp.channels_last:
        channels_last(module)
    if comp.quantization is not None:
        with rep.stage(f"{comp.name}: quantize ({comp.quantization.method})"):
            done["quantization"] = quantize(comp.name, module, comp.quantization)
    return done


def _save_weights(name: str, exported: Any, folder: Path) -> dict[str, ConstantSpec]:
    """Save exactly the constants the package names, contiguous, and record each one's layout."""
    from safetensors.torch import save_file
    from torch._inductor import aoti_load_package

    names = aoti_load_package(str(folder / PACKAGE_FILE)).get_constant_fqns()
    available = {**exported.state_dict, **exported.constants}
    missing = [n for n in names if n not in available]
    if missing:
        raise BuildError(f"{name}: the compiled package expects constants the exported program lacks: {missing[:5]}")
    tensors, specs, seen = {}, {}, set()
    for key in sorted(names):
        t = available[key].detach()
        specs[key] = ConstantSpec(list(t.shape), str(t.dtype).removeprefix("torch."), list(t.stride()))
        t = t.contiguous()
        if t.data_ptr() in seen:  # safetensors refuses tensors that share memory (tied weights)
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t.cpu()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return specs


def _save_pipeline(pipe: Any, folder: Path, skip: set[str]) -> None:
    # model_index.json keeps every component's class, so from_pretrained accepts the stand-ins in their place.
    folder.mkdir()
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is not None and name not in skip:
            component.save_pretrained(folder / name)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _manifest(
    recipe: Recipe, info: SourceInfo, entries: dict[str, ComponentEntry], files: dict[str, FileEntry]
) -> Manifest:
    return Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        versions={
            "diffbake": __version__,
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "torchao": _version("torchao"),
            "python": platform.python_version(),
        },
        host={**host_facts(torch.device(recipe.device).type), "dtype": recipe.dtype},
        source=info.to_dict(),
        pipeline_class=info.pipeline_class,
        pipeline=PIPELINE_DIR,
        components=entries,
        files=files,
    )
