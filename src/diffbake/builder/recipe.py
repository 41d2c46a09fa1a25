"""Recipes: the TOML file that says what to build.

The whole recipe is validated here, before anything is downloaded or compiled: every key is known and typed, and
the target is possible on this host. Checks that need the model's own configuration (does the pipeline have this
component, is the height a multiple of the VAE scale factor) live in :func:`check_against_source`, which
``build`` calls after reading the source's configs and before loading any weights.

Example::

    [source]
    model = "tiny:sd"           # Hub id, local save_pretrained folder, tiny:sd|sdxl|flux, random:sd15|flux-small
    revision = "main"           # optional, Hub ids only

    [target]
    device = "cpu"              # "cpu" | "cuda"
    dtype = "float32"           # "float32" | "bfloat16" | "float16"
    cpu_isa = "native"          # CPU code for: "native" (this host) | "avx2" (x86-64-v3) | "avx512" (x86-64-v4)
    allow_emulated = false      # CPU bfloat16/float16 without native support (AVX512_BF16, AMX): refused unless true

    [components.unet]           # the pipeline attribute, or "vae_decoder" for vae.decode
    shapes = { batch = 1, height = 64, width = 64 }
    cfg = true                  # compile the doubled guidance batch (default: whatever the pipeline does)

    fuse_qkv = true             # optional transforms, applied in this order after the dtype
    channels_last = true
    quantization = { method = "int8_dynamic", exclude = ["*proj_out*"], min_features = 256 }
    mode = "full"               # or "regional": one package per distinct repeated block
    step_cache = { method = "first_block", threshold = 0.08 }     # regional only: diffusers' cache, on at load
    compiler = { preset = "max-autotune", conv_1x1_as_mm = true }   # inductor options (an allow-list)

    [components.vae_decoder]
    shapes = [                  # several variants sharing one weights file; a range is a dynamic dimension
      { batch = 1, height = 64, width = 64 },
      { batch = [1, 4], height = [32, 128], width = [32, 128] },
    ]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diffbake.errors import RecipeError
from diffbake.format.components import (
    BUILTIN_MODELS,
    BUILTIN_PREFIXES,
    KNOWN_COMPONENTS,
    STEP_CACHES,
    VAE_DECODER,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")

_TOP_KEYS = ("source", "target", "components")
_SOURCE_KEYS = ("model", "revision")
_TARGET_KEYS = ("device", "dtype", "cpu_isa", "allow_emulated")
CPU_ISAS = ("native", "avx2", "avx512")
_COMPONENT_KEYS = ("shapes", "cfg", "mode", "fuse_qkv", "channels_last", "quantization", "compiler", "step_cache")
_STEP_CACHE_KEYS = ("method", "threshold")

# [components.X.compiler]: the inductor options a recipe may set, as in the diffusers performance guides.
# name -> (type, devices it has an effect on). Anything else is refused: diffbake sets the packaging options itself.
COMPILER_OPTIONS: dict[str, tuple[type, tuple[str, ...]]] = {
    "conv_1x1_as_mm": (bool, ("cpu", "cuda")),
    "epilogue_fusion": (bool, ("cpu", "cuda")),
    "shape_padding": (bool, ("cpu", "cuda")),
    "aggressive_fusion": (bool, ("cpu", "cuda")),
    "max_autotune": (bool, ("cpu", "cuda")),
    # Inductor turns a model with convolutions channels_last by itself; on a CPU in float32 that made SD 1.5's
    # UNet 1.22x slower than with it off (3.25 s against 2.67 s a step, AVX-512 EPYC).
    "layout_optimization": (bool, ("cpu", "cuda")),
    # Weights folded into the compiled code, convolution and linear weights prepacked once in oneDNN's blocked
    # layouts, and the convolutions fused with the additions and activations around them. SD 1.5's UNet step in
    # bfloat16 went from 1.25 s to 0.95 s (AVX-512 EPYC). The package then holds the component's weights, in
    # layouts chosen for the build host's CPU: no rebind or set_weights, and only CPUs with the build host's
    # oneDNN instruction sets load it, since others reorder every weight on every call (see
    # format.host.ONEDNN_ISA). Full builds only.
    "freezing": (bool, ("cpu",)),
    # These tune Triton kernels, which only CUDA builds generate.
    "coordinate_descent_tuning": (bool, ("cuda",)),
    "coordinate_descent_check_all_directions": (bool, ("cuda",)),
    "triton.unique_kernel_names": (bool, ("cuda",)),
    # Not inductor options, but chosen while exporting and compiling too (see builder.compile_settings):
    "tf32": (bool, ("cuda",)),  # TF32 matmuls and convolutions
    "attention_backend": (str, ("cpu", "cuda")),  # the SDPA kernel compiled in: see ATTENTION_BACKENDS
}
# attention_backend -> (torch SDPBackend name, devices). "math" compiles attention as matmuls and a softmax; the
# others as one fused kernel.
ATTENTION_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "math": ("MATH", ("cpu", "cuda")),
    "flash": ("FLASH_ATTENTION", ("cpu", "cuda")),
    "efficient": ("EFFICIENT_ATTENTION", ("cuda",)),
    "cudnn": ("CUDNN_ATTENTION", ("cuda",)),
}
# Presets: the options the guides use together. A preset keeps only the options that apply to the target device.
COMPILER_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "max-autotune": {
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "coordinate_descent_check_all_directions": True,
        "epilogue_fusion": False,
        "max_autotune": True,
    },
}
MODES = ("full", "regional")
_SHAPE_KEYS = ("batch", "height", "width", "text_tokens", "image_height", "image_width")
_REQUIRED_SHAPE_KEYS = ("batch", "height", "width")
# Sizes in pixels: multiples of what one latent token covers, and dynamic ranges step by it.
PIXEL_SIZES = ("height", "width", "image_height", "image_width")
_QUANT_KEYS = ("method", "include", "exclude", "min_features")

# Recipe name -> torchao config class (see transforms.py); torchao is imported only when a recipe quantizes.
QUANT_METHODS: dict[str, str] = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "float8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
}
# Methods whose kernels need a CUDA GPU of at least this compute capability.
QUANT_MIN_CUDA_CAPABILITY: dict[str, tuple[int, int]] = {"float8_dynamic": (8, 9)}


@dataclass(frozen=True)
class Quantization:
    """torchao quantization of a component's linear layers."""

    method: str
    include: tuple[str, ...] = ("*",)  # fnmatch patterns on module names, e.g. "*attn*"
    exclude: tuple[str, ...] = ()
    min_features: int = 0  # quantize a linear only if in_features and out_features are both at least this

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "min_features": self.min_features,
        }


Size = int | tuple[int, int]  # a static size, or an inclusive [min, max] range compiled as a dynamic dimension


@dataclass(frozen=True)
class Shapes:
    """Shapes of one compiled variant, in the pipeline's terms (images per call, pixels, tokens)."""

    batch: Size
    height: Size
    width: Size
    text_tokens: Size | None = None
    # The input image's size where the pipeline takes one of another size than its output (Flux Kontext's
    # reference image); None: the output's size.
    image_height: Size | None = None
    image_width: Size | None = None

    def to_dict(self) -> dict[str, int | list[int]]:
        d = {k: getattr(self, k) for k in _SHAPE_KEYS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v is not None}

    @property
    def dynamic(self) -> bool:
        return any(isinstance(getattr(self, k), tuple) for k in _SHAPE_KEYS)


@dataclass(frozen=True)
class Variant:
    """One compiled package of a component: its shapes, and whether the CFG batch doubling is compiled in."""

    shapes: Shapes
    # True: the pipeline's doubled classifier-free guidance batch is compiled in; False: it is not (the pipeline
    # is called with guidance_scale = 1); None: as the pipeline does by default (learnt from the captured call).
    cfg: bool | None = None


@dataclass(frozen=True)
class ComponentRecipe:
    name: str
    variants: tuple[Variant, ...]
    fuse_qkv: bool = False
    channels_last: bool = False
    quantization: Quantization | None = None
    mode: str = "full"  # "regional": compile one package per distinct repeated block, run the rest eager
    compiler: tuple[tuple[str, Any], ...] = ()  # inductor options (preset expanded), in name order
    step_cache: tuple[tuple[str, Any], ...] = ()  # method and threshold of the cache turned on at load

    @property
    def transformed(self) -> bool:
        return self.fuse_qkv or self.channels_last or self.quantization is not None

    @property
    def frozen(self) -> bool:
        """Compiled with ``freezing``: its packages hold its weights (see COMPILER_OPTIONS)."""
        return bool(dict(self.compiler).get("freezing"))


@dataclass(frozen=True)
class Recipe:
    model: str
    revision: str | None
    device: str
    dtype: str
    components: dict[str, ComponentRecipe]
    cpu_isa: str = "native"  # the CPU instruction set compiled code may use (the wrapper's, on CUDA too)
    text: str = ""  # the recipe verbatim, copied into the artifact
    path: Path | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """Default artifact name: the recipe file's stem."""
        return self.path.stem if self.path is not None else "artifact"

    @property
    def is_builtin(self) -> bool:
        return self.model in BUILTIN_MODELS


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    Args:
        path: the TOML file.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: the file is missing, is not TOML, or any key or value is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(
            f"{path}: no such recipe file; pass the path of a TOML recipe such as recipes/tiny-sd.toml"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e})") from e
    return parse_recipe(text, path=path)


def parse_recipe(text: str, *, path: str | Path | None = None) -> Recipe:
    """Validate a recipe given as TOML text. See :func:`load_recipe`."""
    where = str(path) if path is not None else "recipe"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: not valid TOML: {e}") from e
    v = _Validator(where)
    v.keys(data, _TOP_KEYS, "the top level")
    model, revision = _source(v, data)
    device, dtype, cpu_isa = _target(v, data)
    tables = v.table(data, "components", required=True)
    v.keys(tables, KNOWN_COMPONENTS, "[components]", what="component")
    if not tables:
        raise RecipeError(
            f"{where}: [components] is empty; name at least one component to compile, "
            f"one of: {', '.join(KNOWN_COMPONENTS)}"
        )
    components = {name: _component(v, name, table, device) for name, table in tables.items()}
    return Recipe(
        model, revision, device, dtype, components, cpu_isa=cpu_isa, text=text, path=Path(path) if path else None
    )


def _source(v: _Validator, data: dict[str, Any]) -> tuple[str, str | None]:
    source = v.table(data, "source", required=True)
    v.keys(source, _SOURCE_KEYS, "[source]")
    model = v.string(source, "model", "[source]", required=True)
    revision = v.string(source, "revision", "[source]")
    if model.startswith(BUILTIN_PREFIXES):
        if model not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN_MODELS)
            raise RecipeError(f"{v.where}: [source] model = {model!r} is not a built-in pipeline; known: {known}")
        if revision is not None:
            raise RecipeError(f"{v.where}: [source] revision applies to Hub ids only; remove it for {model!r}")
    return model, revision


def _target(v: _Validator, data: dict[str, Any]) -> tuple[str, str, str]:
    target = v.table(data, "target")
    v.keys(target, _TARGET_KEYS, "[target]")
    device = v.choice(target, "device", "[target]", DEVICES, default="cpu")
    dtype = v.choice(target, "dtype", "[target]", DTYPES, default="float32")
    cpu_isa = v.choice(target, "cpu_isa", "[target]", CPU_ISAS, default="native")
    if device == "cuda":
        _require_cuda(v.where)
    if cpu_isa != "native":
        _require_cpu_isa(v.where, cpu_isa)
    if device == "cpu" and not v.boolean(target, "allow_emulated", "[target]"):
        _require_native_half(v.where, dtype, cpu_isa)
    return device, dtype, cpu_isa


def _component(v: _Validator, name: str, table: Any, device: str) -> ComponentRecipe:
    where, section = v.where, f"[components.{name}]"
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: {section} must be a table, found {_typename(table)}")
    v.keys(table, _COMPONENT_KEYS, section)
    cfg = v.optional_bool(table, "cfg", section)
    if name == VAE_DECODER and cfg is not None:
        raise RecipeError(f"{where}: {section} cfg applies to the denoiser only; remove it here")
    variants = _variants(v, name, table, section, cfg)
    flags = {k: v.boolean(table, k, section) for k in ("fuse_qkv", "channels_last")}
    quant = _quantization(v, v.table(table, "quantization", section=section), section, device)
    mode = v.choice(table, "mode", section, MODES, default="full")
    if mode == "regional":
        if name == VAE_DECODER:
            raise RecipeError(f"{where}: {section} mode = 'regional': the VAE has no repeated blocks; remove the key")
        if len(variants) > 1 or variants[0].shapes.dynamic:
            raise RecipeError(
                f"{where}: {section} mode = 'regional' compiles one static shape; give one shapes table "
                "without ranges, or use mode = 'full'"
            )
    compiler = _compiler(v, v.table(table, "compiler", section=section), section, device)
    if dict(compiler).get("freezing"):
        if mode == "regional":
            raise RecipeError(
                f"{where}: {section} compiler freezing folds the weights into the package, but a regional build "
                "binds each block instance's weights at load; remove freezing, or use mode = 'full'"
            )
        if quant is not None:
            raise RecipeError(
                f"{where}: {section} compiler freezing is not supported with quantization (torchao's tensors are "
                "not prepacked by it); remove one of the two"
            )
    step_cache = _step_cache(v, v.table(table, "step_cache", section=section), section, mode)
    return ComponentRecipe(
        name, tuple(variants), quantization=quant, mode=mode, compiler=compiler, step_cache=step_cache, **flags
    )


def _step_cache(v: _Validator, table: dict, section: str, mode: str) -> tuple[tuple[str, Any], ...]:
    if not table:
        return ()
    label = f"{section} step_cache"
    v.keys(table, _STEP_CACHE_KEYS, label)
    if mode != "regional":
        raise RecipeError(
            f"{v.where}: {label}: diffusers' step caches skip the model's repeated blocks, which a full-graph build "
            "compiles into one call; set mode = 'regional' in this section, or remove step_cache"
        )
    method = v.choice(table, "method", label, tuple(STEP_CACHES), default="")
    threshold = table.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold > 0:
        raise RecipeError(
            f"{v.where}: {label} threshold must be a positive number (e.g. 0.08), found {_typename(threshold)} "
            f"{threshold!r}"
        )
    return (("method", method), ("threshold", float(threshold)))


def _variants(v: _Validator, name: str, table: dict[str, Any], section: str, cfg: bool | None) -> list[Variant]:
    where = v.where
    if "shapes" not in table:
        raise RecipeError(f"{where}: missing {section} shapes")
    entries = table["shapes"] if isinstance(table["shapes"], list) else [table["shapes"]]
    if not entries:
        raise RecipeError(f"{where}: {section} shapes is an empty array; give at least one shapes table")
    variants: list[Variant] = []
    for i, entry in enumerate(entries):
        label = f"{section} shapes" + (f"[{i}]" if isinstance(table["shapes"], list) else "")
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: {label} must be a table, found {_typename(entry)}")
        v.keys(entry, _SHAPE_KEYS + ("cfg",), label)
        sizes = {k: v.size(entry, k, label, required=k in _REQUIRED_SHAPE_KEYS) for k in _SHAPE_KEYS}
        entry_cfg = v.optional_bool(entry, "cfg", label)
        if name == VAE_DECODER and (entry_cfg is not None or sizes["text_tokens"] is not None):
            extra = "cfg" if entry_cfg is not None else "text_tokens"
            raise RecipeError(f"{where}: {label} {extra} applies to the denoiser only; remove it here")
        if (sizes["image_height"] is None) != (sizes["image_width"] is None):
            given, missing = (
                ("image_width", "image_height") if sizes["image_height"] is None else ("image_height", "image_width")
            )
            raise RecipeError(
                f"{where}: {label} has {given} but no {missing}; give both (the input image's size) or neither "
                "(an input image of the output's size)"
            )
        if name == VAE_DECODER and sizes["image_height"] is not None:
            raise RecipeError(
                f"{where}: {label} image_height and image_width: the VAE decoder makes the output image, of height "
                "x width; remove them here"
            )
        variant = Variant(Shapes(**sizes), cfg if entry_cfg is None else entry_cfg)
        if variant in variants:
            raise RecipeError(f"{where}: {label} repeats an earlier variant; remove one")
        variants.append(variant)
    return variants


def check_against_source(recipe: Recipe, info: Any) -> Recipe:
    """Check the recipe against what the source's configs and pipeline class say (``info``, a
    :class:`~diffbake.builder.sources.SourceInfo`); fill in what the pipeline itself defaults to.

    Returns:
        The recipe with the text length filled in from the pipeline's ``max_sequence_length`` default where it
        takes one. Whether a variant runs classifier-free guidance is learnt from the captured call.

    Raises:
        RecipeError: a component the pipeline lacks, or a shape it cannot take.
    """
    from diffbake.format.components import COMPONENTS

    where = str(recipe.path) if recipe.path is not None else "recipe"
    compilable = [n for n, c in COMPONENTS.items() if c.attribute in info.components]
    params = info.call_parameters
    filled = {}
    for name, comp in recipe.components.items():
        section = f"[components.{name}]"
        if name not in compilable:
            raise RecipeError(
                f"{where}: {section}: a {info.pipeline_class} has no component {name!r}; "
                f"its compilable components are: {', '.join(compilable)}"
            )
        variants = []
        for variant in comp.variants:
            _check_pixels(where, section, variant, info)
            cfg, tokens = variant.cfg, variant.shapes.text_tokens
            if cfg is not None and "guidance_scale" not in params:
                raise RecipeError(
                    f"{where}: {section} cfg: {info.pipeline_class} takes no guidance_scale, so it has no "
                    "classifier-free guidance batch; remove the key"
                )
            if tokens is not None and "max_sequence_length" not in params:
                raise RecipeError(
                    f"{where}: {section} shapes.text_tokens: {info.pipeline_class} takes no max_sequence_length "
                    "(its text length is the tokenizer's fixed length); remove the key"
                )
            if variant.shapes.image_height is not None and not {"image", "height", "width"} <= set(params):
                raise RecipeError(
                    f"{where}: {section} shapes.image_height and image_width: {info.pipeline_class} takes no input "
                    "image of another size than its output (it takes no image, or makes its output at the "
                    "image's size); remove them and set height and width to the image's size"
                )
            if tokens is None and (name == info.denoiser or name.startswith("text_encoder")):
                tokens = info.default_text_tokens  # the T5 encoder takes that length too; CLIP's 77 is fixed
            variants.append(Variant(replace(variant.shapes, text_tokens=tokens), cfg))
        filled[name] = replace(comp, variants=tuple(variants))
    return replace(recipe, components=filled)


def _check_pixels(where: str, section: str, variant: Variant, info: Any) -> None:
    """Height and width: multiples of what the pipeline packs into one latent token, or its one native size."""
    multiple = info.pixel_multiple
    for dim in PIXEL_SIZES:
        size = getattr(variant.shapes, dim)
        if size is None:
            continue
        if info.native_size is not None and dim in ("height", "width") and size != info.native_size:
            raise RecipeError(
                f"{where}: {section} shapes.{dim} = {list(size) if isinstance(size, tuple) else size}: "
                f"{info.pipeline_class} takes no {dim}; it makes {info.native_size}x{info.native_size} images "
                f"(its denoiser's sample_size); set height = width = {info.native_size}"
            )
        for value in size if isinstance(size, tuple) else (size,):
            if value % multiple:
                lower = value // multiple * multiple
                hint = f"use {lower} or {lower + multiple}" if lower else f"use {multiple}"
                why = f"the VAE scale factor {info.vae_scale_factor}" + (
                    f" times the {info.patch}x{info.patch} latent patches of one token" if info.patch > 1 else ""
                )
                raise RecipeError(
                    f"{where}: {section} shapes.{dim} = {value} is not a multiple of {multiple} ({why} of this "
                    f"{info.pipeline_class}); {hint}"
                )


def _quantization(v: _Validator, table: dict, section: str, device: str) -> Quantization | None:
    if not table:
        return None
    label = f"{section} quantization"
    v.keys(table, _QUANT_KEYS, label)
    if "method" not in table:
        raise RecipeError(f"{v.where}: missing 'method' in {label}; one of: {', '.join(QUANT_METHODS)}")
    method = v.choice(table, "method", label, tuple(QUANT_METHODS), default="")
    need = QUANT_MIN_CUDA_CAPABILITY.get(method)
    if need is not None:
        import torch

        have = torch.cuda.get_device_capability() if device == "cuda" and torch.cuda.is_available() else None
        if have is None or have < need:
            found = f"compute capability {have[0]}.{have[1]}" if have else f"device = {device!r}"
            raise RecipeError(
                f"{v.where}: {label} method = {method!r} needs a CUDA GPU of compute capability "
                f"{need[0]}.{need[1]} or newer (found {found}); use float8_weight_only or int8_dynamic instead"
            )
    patterns = {}
    for key, default in (("include", ["*"]), ("exclude", [])):
        value = table.get(key, default)
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise RecipeError(f'{v.where}: {label} {key} must be an array of name patterns such as ["*attn*"]')
        patterns[key] = tuple(value)
    min_features = table.get("min_features", 0)
    if isinstance(min_features, bool) or not isinstance(min_features, int) or min_features < 0:
        raise RecipeError(f"{v.where}: {label} min_features must be a non-negative integer, found {min_features!r}")
    return Quantization(method, patterns["include"], patterns["exclude"], min_features)


def _compiler(v: _Validator, table: dict, section: str, device: str) -> tuple[tuple[str, Any], ...]:
    label = f"{section} compiler"
    preset = table.get("preset", "default")
    if preset not in COMPILER_PRESETS:
        raise RecipeError(
            f"{v.where}: {label} preset = {preset!r} is not a preset; expected one of: {', '.join(COMPILER_PRESETS)}"
        )
    options = {k: val for k, val in COMPILER_PRESETS[preset].items() if device in COMPILER_OPTIONS[k][1]}
    for key, value in table.items():
        if key == "preset":
            continue
        if key not in COMPILER_OPTIONS:
            raise RecipeError(
                f"{v.where}: {label}: unknown option {key!r}; known: preset, {', '.join(COMPILER_OPTIONS)}"
            )
        kind, devices = COMPILER_OPTIONS[key]
        if type(value) is not kind:
            raise RecipeError(f"{v.where}: {label} {key} must be {_typename(kind())}, found {_typename(value)}")
        if device not in devices:
            raise RecipeError(
                f"{v.where}: {label} {key} applies to {' and '.join(devices)} builds only (this recipe targets "
                f"{device!r}); remove it"
            )
        if key == "attention_backend":
            known = [b for b, (_, on) in ATTENTION_BACKENDS.items() if device in on]
            if value not in known:
                raise RecipeError(
                    f"{v.where}: {label} attention_backend = {value!r} is not available for {device!r} builds; "
                    f"expected one of: {', '.join(known)}"
                )
        options[key] = value
    return tuple(sorted(options.items()))


def _require_cpu_isa(where: str, cpu_isa: str) -> None:
    import platform

    from diffbake.format.host import CPU_TARGETS, cpu_features

    if platform.machine() not in ("x86_64", "AMD64"):
        raise RecipeError(
            f"{where}: [target] cpu_isa = {cpu_isa!r} names an x86-64 instruction set, but this host is "
            f"{platform.machine()}; remove the key (native)"
        )
    have = cpu_features()
    missing = sorted(set(CPU_TARGETS[cpu_isa][2]) - have) if have is not None else []
    if missing:
        # The build runs the compiled code to check it against eager, so the build host must execute it.
        raise RecipeError(
            f"{where}: [target] cpu_isa = {cpu_isa!r} needs {', '.join(missing)}, which this build host lacks; "
            "the build runs the compiled code to verify it: build on a CPU that has them, or choose a lower cpu_isa"
        )


def _require_native_half(where: str, dtype: str, cpu_isa: str) -> None:
    """A CPU half-precision build needs it native on the build host (which runs the eager reference and the
    compiled code) and in the CPU target (where the artifact will run)."""
    from diffbake.format.host import CPU_TARGETS, NATIVE_HALF, cpu_features, half_precision_path

    if dtype not in NATIVE_HALF:
        return
    names = " or ".join(n.upper() for n in NATIVE_HALF[dtype][:2])
    fix = 'use dtype = "float32" (with int8 quantization for speed), or set allow_emulated = true to build anyway'
    host = cpu_features()
    if half_precision_path(dtype, host) == "emulated":
        raise RecipeError(
            f"{where}: [target] dtype = {dtype!r}: this build host's CPU has no native {dtype} ({names}), so torch "
            f"emulates it: a 3x3 convolution ran 190x slower than in float32 on such a CPU, and the build's eager "
            f"reference alone can take hours; build on a CPU that has {names}, {fix}"
        )
    if cpu_isa != "native" and half_precision_path(dtype, set(CPU_TARGETS[cpu_isa][2])) == "emulated":
        raise RecipeError(
            f"{where}: [target] dtype = {dtype!r} with cpu_isa = {cpu_isa!r}: that target does not include "
            f"{names}, so the CPUs it is built for may emulate {dtype}, many times slower than float32; "
            f'build with cpu_isa = "native" for CPUs like this one, {fix}'
        )


def _require_cuda(where: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            f"{where}: [target] device = 'cuda' but this host has no CUDA GPU; AOTInductor generates and tunes "
            'CUDA code on the GPU itself, so build on a host with the target GPU, or set device = "cpu"'
        )


def _typename(value: Any) -> str:
    return {
        dict: "a table",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
    }.get(type(value), type(value).__name__)


class _Validator:
    """Small typed accessors that raise RecipeError with the file name and the key's place."""

    def __init__(self, where: str):
        self.where = where

    def keys(self, table: dict, known: tuple[str, ...], section: str, what: str = "key") -> None:
        for key in table:
            if key not in known:
                raise RecipeError(
                    f"{self.where}: unknown {what} {key!r} in {section}; known {what}s: {', '.join(known)}"
                )

    def table(self, data: dict, key: str, required: bool = False, section: str = "") -> dict:
        label = f"{section} {key}".strip() if section else f"[{key}]"
        if key not in data:
            if required:
                raise RecipeError(f"{self.where}: missing {label}")
            return {}
        value = data[key]
        if not isinstance(value, dict):
            raise RecipeError(f"{self.where}: {label} must be a table, found {_typename(value)}")
        return value

    def string(self, table: dict, key: str, section: str, required: bool = False) -> str | None:
        if key not in table:
            if required:
                raise RecipeError(f"{self.where}: missing {key!r} in {section}")
            return None
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise RecipeError(
                f"{self.where}: {section} {key} must be a non-empty string, found {_typename(value)} {value!r}"
            )
        return value

    def boolean(self, table: dict, key: str, section: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise RecipeError(
                f"{self.where}: {section} {key} must be true or false, found {_typename(value)} {value!r}"
            )
        return value

    def choice(self, table: dict, key: str, section: str, choices: tuple[str, ...], default: str) -> str:
        value = table.get(key, default)
        if value not in choices:
            raise RecipeError(
                f"{self.where}: {section} {key} = {value!r} is not supported; expected one of: {', '.join(choices)}"
            )
        return value

    def optional_bool(self, table: dict, key: str, section: str) -> bool | None:
        return self.boolean(table, key, section) if key in table else None

    def size(self, table: dict, key: str, section: str, required: bool) -> Size | None:
        """A positive integer, or an inclusive range [min, max] of them."""
        value = table.get(key)
        if not isinstance(value, list):
            return self.positive_int(table, key, section, required)
        ok = (
            len(value) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)
            and value[0] <= value[1]
        )
        if not ok:
            raise RecipeError(
                f"{self.where}: {section} {key} = {value!r}: a range is [min, max] of positive integers with min <= max"
            )
        return value[0] if value[0] == value[1] else (value[0], value[1])

    def positive_int(self, table: dict, key: str, section: str, required: bool) -> int | None:
        if key not in table:
            if required:
                raise RecipeError(f"{self.where}: missing {key!r} in {section}")
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RecipeError(
                f"{self.where}: {section} {key} must be a positive integer, found {_typename(value)} {value!r}"
            )
        return value
