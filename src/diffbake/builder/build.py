"""build(recipe): the whole story of turning a diffusers pipeline into an artifact, top to bottom.

recipe ─► source configs ─► shape checks ─► load pipeline ─► per component:
    example inputs ─► eager reference ─► torch.export ─► AOTInductor ─► weights ─► verify vs eager
─► save the eager rest ─► manifest last ─► rename into place
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from diffbake import __version__
from diffbake.builder.aoti import compile_package, inductor_configs, required_cpu_features
from diffbake.builder.cache import CompileCache
from diffbake.builder.capture import (
    OTHER_PROMPTS,
    PROMPT,
    capture,
    class_name,
    pipeline_kwargs,
    save_config,
    stand_in_needs,
)
from diffbake.builder.contract import Point, Range, derive, points_for
from diffbake.builder.export import FlatCall, NeedsMultiple, dynamic_shapes, export_component
from diffbake.builder.recipe import (
    ATTENTION_BACKENDS,
    PIXEL_SIZES,
    ComponentRecipe,
    Recipe,
    Variant,
    check_against_source,
    load_recipe,
)
from diffbake.builder.regional import BlockCall, capture_blocks
from diffbake.builder.sources import SourceInfo, inspect_source, load_module, load_pipeline
from diffbake.builder.transforms import QUANT_TOLERANCES, channels_last, fuse_qkv, quantize, unwrap_for_export
from diffbake.errors import ArtifactError, BuildError, RebindError, RecipeError, VerificationError
from diffbake.format.components import CFG_GUIDANCE, COMPONENTS, VAE_DECODER
from diffbake.format.host import host_facts
from diffbake.format.manifest import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PACKAGE_FILE,
    PIPELINE_DIR,
    RECIPE_FILE,
    WEIGHTS_FILE,
    BlockEntry,
    ComponentEntry,
    ConstantSpec,
    FileEntry,
    Host,
    Manifest,
    SelfTest,
    TensorSpec,
    VariantEntry,
)
from diffbake.format.staging import Staging
from diffbake.runtime.compiled import CompiledComponent
from diffbake.runtime.guards import call_leaves
from diffbake.runtime.outputs import flatten_output
from diffbake.runtime.packages import Package, unpack_dir
from diffbake.runtime.regional import load_regional, regional_class
from diffbake.runtime.selftest import SEED, self_test_inputs, summarize

logger = logging.getLogger(__name__)

# Stands in for the self-test until the variant has been verified and its self-test run.
_NO_SELF_TEST = SelfTest(0, {}, {}, [], 0.0, 0.0, 0.0, [], 0.0)

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
    cache: bool = True,
) -> Path:
    """Build an artifact from a recipe.

    Args:
        recipe: a :class:`Recipe` or the path of a TOML recipe.
        out: the artifact folder; defaults to ``artifacts/<recipe name>``.
        force: replace an existing artifact at ``out`` (only once the new one is complete).
        reporter: receives each stage; defaults to logging.
        cache: reuse packages compiled before from the same program for the same target, and keep the new ones
            (:mod:`diffbake.builder.cache`); False compiles every package.

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
    check_destination(dest, force)
    with rep.stage("read source"):
        info = inspect_source(recipe)
        recipe = check_against_source(recipe, info)
        if not info.tested:
            logger.warning(
                "%s is not among the pipelines diffbake is tested with; its build is checked as any",
                info.pipeline_class,
            )
    with rep.stage(f"load {info.pipeline_class} ({recipe.dtype})"):
        # The whole pipeline runs at build, where its calls are captured, so it goes to the target device.
        pipe = load_pipeline(info, recipe.dtype).to(recipe.device)
    return write_artifact(recipe, info, pipe, dest, rep, cache=CompileCache() if cache else None)


def check_destination(dest: Path, force: bool) -> None:
    """Refuse an existing destination without ``force``, and anything but an artifact (or empty folder) with it."""
    if dest.exists() and not force:
        raise BuildError(
            f"{dest}: already exists; pass --force to replace it (only once the new build is complete), or --out DIR"
        )
    if dest.exists() and not (dest.is_dir() and ((dest / MANIFEST_FILE).is_file() or not any(dest.iterdir()))):
        # --force replaces artifacts, never an unrelated folder or file that happens to be at the destination.
        raise BuildError(
            f"{dest}: exists and is not a diffbake artifact (no {MANIFEST_FILE}); refusing to replace it even with "
            "--force; choose another --out"
        )


@dataclass(frozen=True)
class Reuse:
    """Compiled packages to reuse instead of compiling (a rebind): the artifact they are in and its manifest, and
    the pipeline in float32 with the rebind's LoRAs fused, for errors measured against it (None: the source's)."""

    root: Path
    manifest: Manifest
    float32_pipeline: Any = None


def write_artifact(
    recipe: Recipe,
    info: SourceInfo,
    pipe: Any,
    dest: Path,
    rep: Reporter,
    *,
    reuse: Reuse | None = None,
    source_extra: dict[str, Any] | None = None,
    cache: CompileCache | None = None,
) -> Path:
    """Every stage after loading the pipeline: per component transforms, export, compile (or reuse), weights,
    verification against eager and self-test; then the eager rest and the manifest, atomically."""
    with Staging(dest) as staging:
        entries = {
            name: _build_component(comp, pipe, info, recipe, staging.path, rep, reuse, cache)
            for name, comp in recipe.components.items()
        }
        with rep.stage("save the eager components"):
            skip = {COMPONENTS[name].attribute for name in entries}
            _save_pipeline(pipe, staging.path / PIPELINE_DIR, skip)
            (staging.path / RECIPE_FILE).write_text(recipe.text, encoding="utf-8")
        with rep.stage("write manifest"):
            staging.commit(lambda files: _manifest(recipe, info, entries, files, source_extra or {}, reuse))
    return dest


def _build_component(
    comp: ComponentRecipe,
    pipe: Any,
    info: SourceInfo,
    recipe: Recipe,
    root: Path,
    rep: Reporter,
    reuse: Reuse | None,
    cache: CompileCache | None,
) -> ComponentEntry:
    with contextlib.ExitStack() as stack:
        return _build_component_in(comp, pipe, info, recipe, root, rep, reuse, cache, stack)


@contextlib.contextmanager
def compile_settings(comp: ComponentRecipe) -> Iterator[None]:
    """The recipe's process-wide torch settings that shape compiled code (the SDPA kernel, TF32), set for one
    component's build and restored after."""
    options = dict(comp.compiler)
    with contextlib.ExitStack() as stack:
        backend = options.get("attention_backend")
        if backend is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([getattr(SDPBackend, ATTENTION_BACKENDS[backend][0])]))
        if "tf32" in options:
            before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = options["tf32"]
            stack.callback(_restore_tf32, before)
        yield


def _restore_tf32(before: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def inductor_options(comp: ComponentRecipe) -> dict[str, Any]:
    """The recipe's compiler options that are inductor settings (the others are torch settings: compile_settings)."""
    return {k: v for k, v in comp.compiler if k not in ("attention_backend", "tf32")}


def _compile(
    comp: ComponentRecipe,
    recipe: Recipe,
    exported: Any,
    package: Path,
    label: str,
    rep: Reporter,
    cache: CompileCache | None,
) -> None:
    """AOTInductor with the recipe's target and options (those that are torch settings are set around it), or
    the package the compile cache holds for exactly this program and target."""
    device = _device_type(recipe)
    configs = inductor_configs(recipe.cpu_isa, inductor_options(comp))
    if comp.frozen:
        cache = None  # its package holds the weights, which the cache's key leaves out
    key = cached = None
    if cache is not None:
        # Serializing the graph for its key takes a second or two on a real UNet (1974 nodes): a stage of its own.
        with rep.stage(f"{label}: look up the compile cache"):
            key = cache.key(exported, device=device, inductor_configs=configs)
            cached = cache.lookup(key, device, package.name) if key is not None else None
    if cached is not None:
        with rep.stage(f"{label}: compile (AOTInductor), found in the compile cache"):
            shutil.copyfile(cached, package)
        return
    with rep.stage(f"{label}: compile (AOTInductor)"):
        compile_package(comp.name, exported, package, device=device, configs=configs)
    if cache is not None and key is not None:
        cache.store(key, package)


def _build_component_in(
    comp: ComponentRecipe,
    pipe: Any,
    info: SourceInfo,
    recipe: Recipe,
    root: Path,
    rep: Reporter,
    reuse: Reuse | None,
    cache: CompileCache | None,
    stack: contextlib.ExitStack,
) -> ComponentEntry:
    name = comp.name
    start = time.perf_counter()
    attr, method = COMPONENTS[name].attribute, COMPONENTS[name].method
    module = getattr(pipe, attr)
    module.to(recipe.device).eval()
    if comp.step_cache and not hasattr(module, "enable_cache"):  # before any capture or compile
        raise RecipeError(
            f"{name}: step_cache: {type(module).__name__} takes no diffusers step cache (it has no enable_cache); "
            "remove step_cache from its recipe section"
        )
    with rep.stage(f"{name}: capture the pipeline's calls"):
        plans = _plans(comp, pipe, info, recipe)
    with rep.stage(f"{name}: float32 eager reference"):
        _float32_references(comp, module, method, plans, info, recipe, reuse)
    transforms = apply_transforms(comp, module, rep)
    stack.enter_context(
        compile_settings(comp)
    )  # attention backend and TF32: for the eager reference, export and compile
    for plan in plans:  # the eager component exactly as compiled: same dtype, transforms and settings
        plan.reference = [_run(plan.flat(module, method), p) for p in plan.points]
        if comp.transformed or comp.compiler:
            plan.exported = None  # traced before the transforms and compile settings: export again
    folder = root / name
    folder.mkdir()
    save_config(module, folder)
    if comp.quantization is not None:
        unwrap_for_export(module)
    if comp.mode == "regional":
        return _build_regional(comp, module, method, plans[0], transforms, recipe, folder, rep, start, reuse, cache)
    variants, constants = _compile_variants(comp, module, method, plans, recipe, root, folder, rep, reuse, cache)
    entry = _component_entry(comp, module, plans[0], constants, transforms, variants)
    with rep.stage(f"{name}: verify against eager"):
        # Run through the same loader and input guards the runtime uses: the build fails if loading would.
        compiled = CompiledComponent(root, entry, recipe.device)
        checked = [_compare_with_eager(name, compiled.variants[i], plan, recipe, comp) for i, plan in enumerate(plans)]
    with rep.stage(f"{name}: record self-test"):
        checked = [_self_test(compiled.variants[i], v, plans[i], recipe, comp) for i, v in enumerate(checked)]
        del compiled
    return replace(entry, variants=checked, build_seconds=round(time.perf_counter() - start, 2))


def _float32_references(
    comp: ComponentRecipe,
    module: Any,
    method: str,
    plans: list[_Plan],
    info: SourceInfo,
    recipe: Recipe,
    reuse: Reuse | None,
) -> None:
    """What every error is finally measured against: the component in float32, without transforms (for a rebind
    with LoRAs, with those LoRAs fused)."""
    attr = COMPONENTS[comp.name].attribute
    if recipe.dtype == "float32" and not comp.transformed:
        module32 = module
    elif reuse is not None and reuse.float32_pipeline is not None:
        module32 = getattr(reuse.float32_pipeline, attr).to(recipe.device).eval()
    else:
        module32 = load_module(info, attr, "float32").to(recipe.device).eval()
    for plan in plans:
        plan.reference32 = [_run(plan.flat(module32, method), p, float32=True) for p in plan.points]


def _compile_variants(
    comp: ComponentRecipe,
    module: Any,
    method: str,
    plans: list[_Plan],
    recipe: Recipe,
    root: Path,
    folder: Path,
    rep: Reporter,
    reuse: Reuse | None,
    cache: CompileCache | None,
) -> tuple[list[VariantEntry], dict[str, ConstantSpec]]:
    """Export and compile (or, for a rebind, copy) one package per variant; save the weights they share once."""
    name = comp.name
    reused = reuse.manifest.components[name] if reuse is not None else None
    constants: dict[str, ConstantSpec] | None = None
    variants = []
    for i, plan in enumerate(plans):
        label = name if len(plans) == 1 else f"{name} [{i + 1}/{len(plans)}: {_describe_shapes(plan.variant)}]"
        if reused is not None:
            _same_contract(name, reused.variants[i], plan)
        exported = plan.exported
        if exported is None:
            with rep.stage(f"{label}: export"):
                flat = plan.flat(module, method).eval()
                exported = export_component(name, flat, plan.points[0], dynamic_shapes(plan.specs, plan.dims))
        plan.exported = None
        package = folder / (PACKAGE_FILE if i == 0 else f"model-{i}.pt2")
        if reuse is None:
            _compile(comp, recipe, exported, package, label, rep, cache)
        else:
            shutil.copy2(reuse.root / package.relative_to(root), package)
        if comp.frozen:  # the package holds the weights, folded and prepacked: the weights file holds none
            fqns, source = [], {}
        else:
            opened = Package(package, _device_type(recipe), folder=unpack_dir(), machine=platform.machine())
            fqns, source = opened.constant_names(), exported
        if constants is None:
            with rep.stage(f"{name}: save weights"):
                constants = _save_weights(name, source, fqns, folder)
            if reused is not None:
                _same_constants(name, reused.constants, constants)
        elif set(fqns) != set(constants):
            raise BuildError(
                f"{name}: variant {i + 1} names other constants than variant 1, so they cannot share one weights "
                "file; report it with DIFFBAKE_DEBUG=1 output"
            )
        variants.append(_unmeasured_variant(package.relative_to(root).as_posix(), plan))
        del exported
    assert constants is not None  # a recipe component has at least one variant
    return variants, constants


def _component_entry(
    comp: ComponentRecipe,
    module: Any,
    plan: _Plan,
    constants: dict[str, ConstantSpec],
    transforms: dict[str, Any],
    variants: list[VariantEntry],
    **regional: Any,
) -> ComponentEntry:
    # build_seconds is what the whole component took, known once it is verified (the caller sets it then).
    return ComponentEntry(
        name=comp.name,
        class_name=class_name(type(module)),
        weights=(Path(comp.name) / WEIGHTS_FILE).as_posix(),
        config=(Path(comp.name) / CONFIG_FILE).as_posix(),
        constants=constants,
        transforms=transforms,
        variants=variants,
        build_seconds=0.0,
        compiler=dict(comp.compiler),
        method=COMPONENTS[comp.name].method,
        returns=plan.returns,
        attributes=plan.attributes,
        mixins=plan.mixins,
        step_cache=dict(comp.step_cache) or None,
        **regional,
    )


def _unmeasured_variant(package: str, plan: _Plan) -> VariantEntry:
    # What the loader needs to run the package; its errors and self-test are measured by running it (_compare_with_eager).
    return VariantEntry(
        package=package,
        shapes=plan.variant.shapes.to_dict(),
        cfg=plan.cfg,
        inputs=plan.specs,
        dims=plan.dims,
        constants=plan.constants,
        ignored=plan.ignored,
        outputs=[
            TensorSpec(f"output_{i}", [], str(t.dtype).removeprefix("torch.")) for i, t in enumerate(plan.reference[0])
        ],
        max_abs_error=0.0,
        tolerance=0.0,
        error_vs_float32=0.0,
        self_test=_NO_SELF_TEST,
    )


def _block_package(
    comp: ComponentRecipe,
    module: Any,
    i: int,
    group: Any,
    recipe: Recipe,
    folder: Path,
    rep: Reporter,
    reuse: Reuse | None,
    cache: CompileCache | None,
) -> BlockEntry:
    """Export and compile (or, for a rebind, copy) the package of one group of like blocks."""
    name, root = comp.name, folder.parent
    label = f"{name} block {group.class_name} x{len(group.instances)}"
    package = folder / f"block-{i}.pt2"
    if reuse is not None:
        shutil.copy2(reuse.root / package.relative_to(root), package)
    else:
        first = module.get_submodule(group.instances[0])
        with rep.stage(f"{label}: export"):
            exported = export_component(name, BlockCall(first, group.names, group.nones).eval(), group.example)
        _compile(comp, recipe, exported, package, label, rep, cache)
    return BlockEntry(
        package=package.relative_to(root).as_posix(),
        class_name=group.class_name,
        instances=group.instances,
        inputs=group.specs,
        outputs=group.outputs,
    )


def _build_regional(
    comp: ComponentRecipe,
    module: Any,
    method: str,
    plan: _Plan,
    transforms: dict[str, Any],
    recipe: Recipe,
    folder: Path,
    rep: Reporter,
    start: float,
    reuse: Reuse | None,
    cache: CompileCache | None,
) -> ComponentEntry:
    """One package per distinct repeated block. The weights file holds what runs: the state of the module outside
    the blocks (it runs eager), and for each block instance the constants its package reads (after QKV fusion,
    the fused projections only; after quantization, the quantized data and scales)."""
    name, root = comp.name, folder.parent
    try:  # the class the loader rebuilds, refused before anything is compiled rather than at the check after
        regional_class(name, class_name(type(module)))
    except ArtifactError as e:
        raise BuildError(str(e)) from None
    groups = capture_blocks(name, module, lambda: plan.flat(module, method)(*plan.points[0]))
    reused = reuse.manifest.components[name] if reuse is not None else None
    if reused is not None and [(g.class_name, g.instances) for g in groups] != [
        (b.class_name, b.instances) for b in reused.blocks
    ]:
        raise RebindError(f"{name}: the repeated blocks differ from the compiled artifact's; rebuild instead")
    blocks = [
        _block_package(comp, module, i, group, recipe, folder, rep, reuse, cache) for i, group in enumerate(groups)
    ]
    with rep.stage(f"{name}: save weights"):
        state = _regional_state(module, root, blocks, recipe)
        constants = _save_weights(name, state, list(state), folder)
    if reused is not None:
        _same_constants(name, reused.constants, constants)
    variant = _unmeasured_variant("", plan)  # the blocks are the packages; the variant records the call
    entry = _component_entry(comp, module, plan, constants, transforms, [variant], mode="regional", blocks=blocks)
    with rep.stage(f"{name}: verify against eager"):
        regional = load_regional(root, entry, recipe.device)
        runner = _RegionalRunner(plan.flat(regional, method), variant)
        checked = _compare_with_eager(name, runner, plan, recipe, comp)
    with rep.stage(f"{name}: record self-test"):
        checked = _self_test(runner, checked, plan, recipe, comp)
        del regional, runner
    return replace(entry, variants=[checked], build_seconds=round(time.perf_counter() - start, 2))


def _regional_state(module: Any, root: Path, blocks: list[BlockEntry], recipe: Recipe) -> dict[str, torch.Tensor]:
    """The eager module's state outside the blocks, and each block instance's package constants by full name."""
    instances = [f"{fqn}." for b in blocks for fqn in b.instances]
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(tuple(instances))}
    for block in blocks:
        package = Package(root / block.package, _device_type(recipe), folder=unpack_dir(), machine=platform.machine())
        names = [n.removeprefix("block.") for n in package.constant_names()]
        for fqn in block.instances:
            sub = module.get_submodule(fqn)  # buffers too: a non-persistent one is in no state dict
            own = {**dict(sub.named_buffers()), **sub.state_dict()}
            made = [n for n in names if n not in own]
            if made:
                raise BuildError(
                    f"{block.class_name}: block {fqn!r} reads tensors its code makes ({made[:3]}), which a regional "
                    "build cannot bind per block; use mode = 'full'"
                )
            state.update({f"{fqn}.{n}": own[n] for n in names})
    return state


class _RegionalRunner:
    """Calls a regionally compiled module on a flat input list, as the verify step calls a variant."""

    def __init__(self, flat: FlatCall, entry: VariantEntry):
        self.flat, self.entry = flat, entry

    def __call__(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.flat(*values))


class _Plan:
    """One variant's call contract, its inputs at its check points (the example export traces, and every range
    at its maximum), and the reference outputs there."""

    def __init__(self, variant: Variant, contract: Any, cfg: bool | None, exported: Any = None):
        self.variant, self.cfg, self.exported = variant, cfg, exported
        self.specs, self.dims = contract.specs, contract.dims
        self.constants, self.ignored = contract.constants, contract.ignored
        self.example_sizes, self.fill = contract.example_sizes, contract.fill
        self.lists = contract.lists
        self.points = [contract.example] + ([contract.largest] if contract.largest is not None else [])
        self.reference: list[list[torch.Tensor]] = []  # per point, the outputs
        self.reference32: list[list[torch.Tensor]] = []
        self.returns: Any = None
        self.attributes: dict[str, Any] = {}
        self.mixins: list[str] = []

    def flat(self, module: Any, method: str) -> FlatCall:
        return FlatCall(module, method, [s.name for s in self.specs], self.constants, self.lists)


def _plans(comp: ComponentRecipe, pipe: Any, info: SourceInfo, recipe: Recipe) -> list[_Plan]:
    """Capture each variant's calls and derive its contract; the first variant's call also says what the
    stand-in must carry and return."""
    plans: list[_Plan] = []
    for variant in comp.variants:
        plan = _plan(comp, variant, pipe, info, recipe, check_text=not plans)
        if plans and [s.name for s in plan.specs] != [s.name for s in plans[0].specs]:
            # The stand-in picks the tensors out of a call by one list of names, whichever variant then runs.
            raise BuildError(
                f"{comp.name}: the pipeline passes other tensors at {_describe_shapes(variant)} than at "
                f"{_describe_shapes(plans[0].variant)}; build these shapes as separate artifacts"
            )
        key = (plan.variant.shapes, plan.cfg)
        if any((p.variant.shapes, p.cfg) == key for p in plans):
            raise RecipeError(
                f"{recipe.path or 'recipe'}: [components.{comp.name}] shapes: two variants are the same once the "
                f"pipeline's defaults are filled in ({_describe_shapes(replace(variant, cfg=plan.cfg))}); remove one"
            )
        plans.append(plan)
    return plans


_STEPS_TRIED = 4  # how many times export may ask for coarser steps of a dynamic size


def _plan(
    comp: ComponentRecipe, variant: Variant, pipe: Any, info: SourceInfo, recipe: Recipe, check_text: bool = False
) -> _Plan:
    """Capture one variant's calls (re-capturing at coarser steps where export asks for them), derive its
    contract, and record what the stand-in must carry and return. ``check_text``: also capture with other
    prompts, to warn where the text has each prompt's own length (once per component: the first variant)."""
    name = comp.name
    attr, method = COMPONENTS[name].attribute, COMPONENTS[name].method
    module = getattr(pipe, attr)
    _refuse_model_lists(name, module, recipe)
    shapes = variant.shapes.to_dict()
    ranges = {
        d: Range(v[0], v[1], info.pixel_multiple if d in PIXEL_SIZES else 1)
        for d, v in shapes.items()
        if isinstance(v, list)
    }
    static = {d: v for d, v in shapes.items() if not isinstance(v, list)}
    captures: dict[tuple, Any] = {}

    def at(sizes: dict[str, int], guidance: float | None, prompts: dict[str, str] | None = None) -> Point:
        key = (tuple(sorted(sizes.items())), guidance, tuple(sorted((prompts or {}).items())))
        if key not in captures:
            captures[key] = capture(pipe, [name], pipeline_kwargs(pipe, sizes, guidance, prompts))[name]
        return Point(sizes, captures[key])

    cfg, guidance = _guidance(comp, variant, info, recipe, lambda g: at(points_for(static, ranges)[0], g))
    # The VAE never sees the text (and its capture runs the whole denoising loop first): not asked.
    takes_prompt = "prompt" in inspect.signature(type(pipe).__call__).parameters
    if check_text and attr != COMPONENTS[VAE_DECODER].attribute and takes_prompt:
        example = points_for(static, ranges)[0]
        with contextlib.suppress(BuildError, RecipeError):  # a pipeline refusing these prompts: nothing to say
            other = at(example, guidance, OTHER_PROMPTS)
            _warn_if_text_has_the_prompts_length(name, pipe, at(example, guidance), other)
    for _ in range(_STEPS_TRIED):
        points = [at(sizes, guidance) for sizes in points_for(static, ranges)]
        contract = derive(name, points, ranges)
        promote, scalars, returns = _checked_against_capture(name, module, method, contract, points[0].call)
        if promote or scalars:
            contract = derive(name, points, ranges, promote, scalars)
        if not ranges:
            plan = _Plan(replace(variant, cfg=cfg), contract, cfg)
            break
        try:
            flat = FlatCall(module, method, [s.name for s in contract.specs], contract.constants, contract.lists).eval()
            exported = export_component(name, flat, contract.example, dynamic_shapes(contract.specs, contract.dims))
        except NeedsMultiple as e:
            ranges = _coarser(comp, ranges, e, recipe)
            continue
        plan = _Plan(replace(variant, cfg=cfg), contract, cfg, exported)
        break
    else:
        raise BuildError(f"{name}: torch.export kept asking for coarser dynamic sizes; give static shapes")
    attribute = COMPONENTS[name].attribute
    compiled = {COMPONENTS[n].method for n in recipe.components if COMPONENTS[n].attribute == attribute}
    plan.returns = returns
    plan.attributes, plan.mixins = stand_in_needs(name, module, points[0].call.reads, compiled)
    plan.points = [[t.to(recipe.device) for t in p] for p in plan.points]
    return plan


def _warn_if_text_has_the_prompts_length(name: str, pipe: Any, one: Point, other: Point) -> None:
    """Say so where the pipeline passes text at each prompt's own length (Z-Image and Qwen-Image pass only the
    prompt's tokens, not padding to max_sequence_length): the compiled code takes the length captured only.
    torch.export cannot make it dynamic: both transformers specialize on it (their rotary tables and padding)."""
    shapes = {path: tuple(v.shape) for path, v in call_leaves(other.call.arguments) if torch.is_tensor(v)}
    for path, v in call_leaves(one.call.arguments):
        if torch.is_tensor(v) and shapes.get(path, tuple(v.shape)) != tuple(v.shape):
            logger.warning(
                "%s: %s passes the text at each prompt's own length (%r is %s for %r, %s for %r), and its compiled "
                "code takes one length: this artifact refuses the prompts (and negative prompts) whose token count "
                "after the pipeline's truncation differs from the one captured. A text_tokens of N in the recipe "
                "truncates every prompt to N tokens, so that prompts of N tokens or more fit",
                name,
                type(pipe).__name__,
                path,
                tuple(v.shape),
                PROMPT,
                shapes[path],
                OTHER_PROMPTS["prompt"],
            )
            return


def _refuse_model_lists(name: str, module: Any, recipe: Recipe) -> None:
    """diffusers' Multi*ControlNetModel wraps a list of ControlNets, each called with its own control image and
    scale from per-call lists: not one compiled call. Refused by name, with what still works."""
    nets = getattr(module, "nets", None)
    if isinstance(nets, torch.nn.ModuleList):
        raise RecipeError(
            f"{recipe.path or 'recipe'}: [components.{name}]: the pipeline's {name} is a {type(module).__name__} "
            f"of {len(nets)} models, which diffbake does not compile as one call; build from a pipeline with a "
            f"single {type(nets[0]).__name__}, or leave [components.{name}] out (the list then runs eager, and the "
            "denoiser is still compiled with its residuals as inputs)"
        )


def _guidance(
    comp: ComponentRecipe, variant: Variant, info: SourceInfo, recipe: Recipe, example: Callable[[float | None], Point]
) -> tuple[bool | None, float | None]:
    """(the variant's cfg, the guidance_scale to capture with: None for the pipeline's default), from the
    denoiser's call at the pipeline's defaults: cfg True or False where the pipeline doubles its batch for
    guidance, None where it does not. ``cfg = true`` for a pipeline whose default call runs no guidance
    (LDMTextToImagePipeline's guidance_scale = 1.0) captures a call that asks for it (CFG_GUIDANCE)."""
    if comp.name != info.denoiser or "guidance_scale" not in info.call_parameters:
        return None, None
    doubled = derive(comp.name, [example(None)], {}).doubled_batch
    if variant.cfg and not doubled:
        if derive(comp.name, [example(CFG_GUIDANCE)], {}).doubled_batch:
            return True, CFG_GUIDANCE
        raise RecipeError(
            f"{recipe.path or 'recipe'}: [components.{comp.name}] cfg = true: called at its defaults and with "
            f"guidance_scale = {CFG_GUIDANCE}, {info.pipeline_class} does not double the "
            f"{COMPONENTS[comp.name].attribute} batch for classifier-free guidance (a guidance-distilled or LCM "
            "model, say); remove the key"
        )
    if variant.cfg is False and doubled:
        return False, 1.0
    return (True if doubled else None), None


def _coarser(comp: ComponentRecipe, ranges: dict[str, Range], e: NeedsMultiple, recipe: Recipe) -> dict[str, Range]:
    """The ranges in the coarser steps export asked for, or a RecipeError if a range does not fit them."""
    out = dict(ranges)
    for base, factor in e.factors.items():
        if base not in out:
            raise BuildError(f"{comp.name}: torch.export: {e.reason}; give static shapes for this component")
        r = out[base]
        step = r.step * factor
        if r.min % step or r.max % step:
            raise RecipeError(
                f"{recipe.path or 'recipe'}: [components.{comp.name}] shapes.{base} = {[r.min, r.max]}: a dynamic "
                f"range must start and end at multiples of {step}{' pixels' if base in PIXEL_SIZES else ''} "
                f"for this model (torch.export: {e.reason})"
            )
        out[base] = Range(r.min, r.max, step)
    return out


def _checked_against_capture(
    name: str, module: Any, method: str, contract: Any, captured: Any
) -> tuple[set[str], set[str], Any]:
    """Run the module as it will be compiled (tensors and constants, without the ignored arguments) on the
    example: it must return what the pipeline's own call returned, or an ignored argument (a generator) changed
    the result.

    Returns the integer per-sample inputs (timesteps) that give exactly the same output as float32, so that they
    are compiled as float32 and any scheduler's timesteps fit; and the arguments the method takes as a ``float``
    (ControlNet's ``conditioning_scale``) that give the same output as a tensor, so that a call may vary them;
    and the tree the method's result sits in (``ComponentEntry.returns``: what the stand-in rebuilds).
    """
    names = [s.name for s in contract.specs]
    flat = FlatCall(module, method, names, contract.constants, contract.lists)
    with torch.no_grad():
        base = flat(*contract.example)
        returned = flatten_output(captured.output)[1]
        if contract.ignored and not _all_close(base, returned):
            raise BuildError(
                f"{name}: the pipeline passes {', '.join(contract.ignored)}, which changes what "
                f"{type(module).__name__}.{method} returns, and compiled code cannot take it; keep this component eager"
            )
        candidates = [i for i, t in enumerate(contract.example) if t.dim() <= 1 and not t.is_floating_point()]
        promote = set()
        for i in candidates:
            values = list(contract.example)
            values[i] = values[i].float()
            try:
                same = all(torch.equal(a, b) for a, b in zip(flat(*values), base, strict=True))
            except Exception:  # an embedding lookup of a float label, say: not a float input
                same = False
            if same:
                promote.add(names[i])
        scalars = set()
        for path in _float_arguments(module, method, contract.constants):
            constants = {k: v for k, v in contract.constants.items() if k != path}
            as_tensor = FlatCall(module, method, [*names, path], constants, contract.lists)
            try:
                same = _all_close(as_tensor(*contract.example, torch.tensor(contract.constants[path])), list(base))
            except Exception:  # used in Python control flow: it stays a compiled-in value
                same = False
            if same:
                scalars.add(path)
    return promote, scalars, flat.returns


def _float_arguments(module: Any, method: str, constants: dict[str, Any]) -> list[str]:
    """The top-level arguments the method annotates as float and the pipeline passed a float for."""
    import typing

    try:
        hints = typing.get_type_hints(getattr(type(module), method))
    except Exception:  # unresolvable annotations: none is known to be a float
        return []
    found = []
    for path, value in constants.items():
        hint = hints.get(path)
        options = typing.get_args(hint) or (hint,)
        if "." not in path and isinstance(value, float) and float in options:
            found.append(path)
    return found


def _all_close(a: tuple[torch.Tensor, ...] | list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5)
        for x, y in zip(a, b, strict=True)
    )


def _same_contract(name: str, reused: VariantEntry, plan: _Plan) -> None:
    """A rebind reuses compiled code: the new pipeline must call the component exactly as the code was built for."""
    if (reused.inputs, reused.dims, reused.constants) != (plan.specs, plan.dims, plan.constants):
        raise RebindError(
            f"{name}: the new pipeline calls this component otherwise than the compiled code was built for "
            "(other inputs, sizes or Python values); rebuild instead"
        )


def _run(flat: FlatCall, inputs: list[torch.Tensor], float32: bool = False) -> list[torch.Tensor]:
    if float32:
        inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        out = list(flat(*inputs))
    return [t.float() for t in out] if float32 else out


def _tolerance(recipe: Recipe, comp: ComponentRecipe) -> tuple[float, float]:
    atol, rtol = TOLERANCES[recipe.dtype]
    if comp.quantization is not None:
        q_atol, q_rtol = QUANT_TOLERANCES[comp.quantization.method]
        atol, rtol = max(atol, q_atol), max(rtol, q_rtol)
    return atol, rtol


def _self_test(run: Any, entry: VariantEntry, plan: _Plan, recipe: Recipe, comp: ComponentRecipe) -> VariantEntry:
    """Run the compiled variant on the recorded call (seeded noise, and the small inputs as captured) and record
    the output's summary for the serving host to replay."""
    sizes, fill = plan.example_sizes, plan.fill
    recorded = replace(_NO_SELF_TEST, seed=SEED, sizes=sizes, fill=fill)
    with torch.no_grad():
        out = run(self_test_inputs(entry, recorded, recipe.device))
    atol, rtol = _tolerance(recipe, comp)
    tolerance = atol + rtol * max(o.float().abs().max().item() for o in out)
    return replace(entry, self_test=summarize(out, seed=SEED, sizes=sizes, fill=fill, tolerance=tolerance))


def _compare_with_eager(name: str, compiled: Any, plan: _Plan, recipe: Recipe, comp: ComponentRecipe) -> VariantEntry:
    atol, rtol = _tolerance(recipe, comp)
    error = error32 = tolerance = 0.0
    worst = 0.0  # each output is held to its own scale (ControlNet's residuals differ by orders of magnitude)
    for point, reference, reference32 in zip(plan.points, plan.reference, plan.reference32, strict=True):
        for out, ref, ref32 in zip(compiled(point), reference, reference32, strict=True):
            out = out.float()
            e = (out - ref.float()).abs().max().item()
            t = atol + rtol * ref.float().abs().max().item()
            error32 = max(error32, (out - ref32).abs().max().item())
            if not math.isfinite(e) or e / t >= worst:
                worst, error, tolerance = (e / t if math.isfinite(e) else math.inf), e, t
    if not math.isfinite(error) or error > tolerance:
        raise VerificationError(
            f"{name}: compiled output ({_describe_shapes(plan.variant)}) differs from eager by {error:.3g} (max abs), "
            f"more than the {tolerance:.3g} allowed for {_describe_build(recipe, comp)}; report it with "
            "DIFFBAKE_DEBUG=1 output, or try another dtype or quantization"
        )
    logger.info("%s: max abs error vs eager %.3g (tolerance %.3g), vs float32 %.3g", name, error, tolerance, error32)
    return replace(compiled.entry, max_abs_error=error, tolerance=tolerance, error_vs_float32=error32)


def _describe_shapes(variant: Variant) -> str:
    d = variant.shapes.to_dict()
    text = ", ".join(f"{k}={v}" for k, v in d.items())
    return text + (f", cfg={str(variant.cfg).lower()}" if variant.cfg is not None else "")


def _describe_build(recipe: Recipe, comp: ComponentRecipe) -> str:
    return recipe.dtype + (f" with {comp.quantization.method}" if comp.quantization else "")


def apply_transforms(comp: ComponentRecipe, module: torch.nn.Module, rep: Reporter) -> dict[str, Any]:
    """fuse QKV -> channels_last -> quantize, in that order; returns what was applied, for the manifest."""
    done: dict[str, Any] = {"fuse_qkv": comp.fuse_qkv, "channels_last": comp.channels_last, "quantization": None}
    if comp.fuse_qkv:
        with rep.stage(f"{comp.name}: fuse QKV projections"):
            fuse_qkv(comp.name, module)
    if comp.channels_last:
        channels_last(module)
    if comp.quantization is not None:
        with rep.stage(f"{comp.name}: quantize ({comp.quantization.method})"):
            done["quantization"] = quantize(comp.name, module, comp.quantization, blocks_only=comp.mode == "regional")
    return done


def _save_weights(name: str, source: Any, names: list[str], folder: Path) -> dict[str, ConstantSpec]:
    """Save exactly the named constants (of an exported program, or a state dict), contiguous, recording each
    one's layout."""
    from safetensors.torch import save_file

    available = source if isinstance(source, dict) else {**source.state_dict, **source.constants}
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
    # safetensors 0.8 writes the file private (0600); give it the mode every other file of the artifact gets, so
    # that a serving user other than the one who built it can read it.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder / WEIGHTS_FILE, 0o666 & ~mask)
    return specs


def _same_constants(name: str, compiled: dict[str, ConstantSpec], new: dict[str, ConstantSpec]) -> None:
    """A rebind reuses compiled code: the new weights must be exactly what it was compiled for."""
    differences = [f"{k}: missing" for k in sorted(set(compiled) - set(new))]
    differences += [f"{k}: not in the compiled code" for k in sorted(set(new) - set(compiled))]
    for k in sorted(set(compiled) & set(new)):
        a, b = compiled[k], new[k]
        if (a.shape, a.dtype, a.stride) != (b.shape, b.dtype, b.stride):
            differences.append(f"{k}: {b.dtype} {b.shape}, compiled for {a.dtype} {a.shape}")
    if differences:
        raise RebindError(
            f"{name}: the new weights do not fit the compiled code ({len(differences)} differences; first: "
            f"{'; '.join(differences[:5])}); rebind only checkpoints of the same architecture, or rebuild"
        )


def _save_pipeline(pipe: Any, folder: Path, skip: set[str]) -> None:
    # model_index.json keeps every component's class, so from_pretrained accepts the stand-ins in their place.
    folder.mkdir()
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is not None and name not in skip:
            component.save_pretrained(folder / name)


def _device_type(recipe: Recipe) -> str:
    return torch.device(recipe.device).type


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _manifest(
    recipe: Recipe,
    info: SourceInfo,
    entries: dict[str, ComponentEntry],
    files: dict[str, FileEntry],
    source_extra: dict[str, Any],
    reuse: Reuse | None,
) -> Manifest:
    # A rebind copies compiled code: what that code depends on is the compiling host's, not the rebinding one's.
    versions, host = (
        (reuse.manifest.versions, reuse.manifest.host) if reuse is not None else (_versions(), _host(recipe))
    )
    return Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        versions=versions,
        host=host,
        source={**info.to_dict(), **source_extra},
        pipeline_class=info.pipeline_class,
        denoiser=info.denoiser,
        pipeline=PIPELINE_DIR,
        components=entries,
        files=files,
    )


def _versions() -> dict[str, str]:
    return {
        "diffbake": __version__,
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "python": platform.python_version(),
    }


def _host(recipe: Recipe) -> Host:
    return Host(
        **host_facts(_device_type(recipe)),
        dtype=recipe.dtype,
        cpu_isa=recipe.cpu_isa,
        cpu_features=required_cpu_features(recipe.cpu_isa, prepacked=any(c.frozen for c in recipe.components.values())),
    )
