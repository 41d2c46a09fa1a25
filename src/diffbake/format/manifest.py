"""The artifact format: layout names, the manifest's schema, and reading and writing it.

This module imports no torch, so tools can read an artifact without it. The writer always writes the format
name and version; the reader checks them first, then the schema, and refuses anything off-spec.

Layout of an artifact folder::

    manifest.json              written last: its presence means the artifact is complete
    recipe.toml                the recipe, verbatim
    pipeline/                  save_pretrained of every component that is not compiled (+ model_index.json)
    <component>/config.json    the eager module's diffusers config, for the stand-in module
    <component>/weights.safetensors   the package's constants, exactly the names it expects
    <component>/model.pt2      AOTInductor package, code only
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Union

from diffbake.errors import ArtifactError, ArtifactNotFoundError, IntegrityError, RebindError
from diffbake.format.components import KNOWN_COMPONENTS, STEP_CACHES

FORMAT_NAME = "diffbake-artifact"
# 3: call contracts captured from the pipeline (constants, affine dimensions, output class, attributes read).
# 4: several outputs per package and the tree they are returned in; several compiled methods per module.
FORMAT_VERSION = 4

MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.toml"
PIPELINE_DIR = "pipeline"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
PACKAGE_FILE = "model.pt2"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

# Input names are paths into the eager call's keyword arguments: "added_cond_kwargs.text_embeds" is
# kwargs["added_cond_kwargs"]["text_embeds"]. Build and runtime both map between the flat list and the call.
NAME_SEP = "."


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a compiled package.

    A shape entry is a size, or the name of a dynamic dimension described in the variant's ``dims``.
    """

    name: str
    shape: list[int | str]
    dtype: str  # torch dtype name without the "torch." prefix
    # A coerced input is cast to ``dtype`` and broadcast to ``shape`` by the stand-in, because the eager module
    # does the same to it (a scalar or int64 timestep) and the scheduler decides what the pipeline passes.
    coerce: bool = False


@dataclass(frozen=True)
class DimSpec:
    """A dynamic dimension of the compiled inputs: ``multiple * k + offset`` for an integer index ``k``, between
    ``min`` and ``max``.

    Dimensions that follow one recipe size share its index, named by ``base`` (the recipe's "batch", "height",
    "width" or "text_tokens"): the UNet's batch is 2 * batch with guidance, a latent height is height / 8 in
    steps of what the model downsamples by, SD3's text length is 77 + the T5 tokens. A dimension that follows
    several sizes at once (Flux's image tokens, (h / 16) * (w / 16)) is its own base.
    """

    min: int
    max: int
    multiple: int = 1
    offset: int = 0
    base: str = ""  # the shared index; "" means this dimension's own name

    def admits(self, value: int) -> bool:
        return self.min <= value <= self.max and (value - self.offset) % self.multiple == 0

    def index(self, value: int) -> int:
        return (value - self.offset) // self.multiple

    def value(self, index: int) -> int:
        return self.multiple * index + self.offset


@dataclass(frozen=True)
class ConstantSpec:
    shape: list[int]
    dtype: str
    stride: list[int]


@dataclass(frozen=True)
class SelfTest:
    """A seeded call recorded at build, and a summary of what the compiled code returned for it.

    The inputs are seeded standard-normal noise of each input's shape (dynamic dimensions at ``sizes``), except
    the inputs named in ``fill``: those hold the values the pipeline really passed when the build captured its
    call (timesteps, guidance, time ids, class labels), flattened.
    """

    seed: int
    sizes: dict[str, int]
    fill: dict[str, list[float]]
    shape: list[int]
    mean: float
    std: float
    abs_max: float
    probes: list[float]  # output values at evenly spaced flat indices
    tolerance: float  # the largest difference from the recorded values that still passes


@dataclass(frozen=True)
class VariantEntry:
    """One compiled package of a component; all variants of a component share its weights."""

    package: str
    shapes: dict[str, int | list[int]]  # the recipe's shapes: images per call, pixels, tokens; [min, max] ranges
    cfg: bool | None
    inputs: list[TensorSpec]
    dims: dict[str, DimSpec]
    # The call's other arguments, as the pipeline passed them (keyword path -> JSON value, None included): a
    # call with another value is refused, naming the argument. ``ignored``: arguments the build checked do not
    # change the result (a generator passed to a deterministic decoder).
    constants: dict[str, Any]
    ignored: list[str]
    outputs: list[TensorSpec]  # the package's outputs, in the order the component's ``returns`` tree uses them
    max_abs_error: float  # compiled vs the eager component it was compiled from (same dtype and transforms)
    tolerance: float
    error_vs_float32: float  # compiled vs the float32 eager component without transforms
    self_test: SelfTest

    @property
    def dynamic(self) -> bool:
        return bool(self.dims)


@dataclass(frozen=True)
class BlockEntry:
    """Regional compilation: one package serving every instance of a repeated block with the same shapes."""

    package: str
    class_name: str
    instances: list[str]  # module names inside the component; each binds its own weights
    inputs: list[TensorSpec]
    outputs: int  # 0: the block returns one tensor; n: a tuple of n tensors


@dataclass(frozen=True)
class ComponentEntry:
    name: str
    class_name: str  # the eager diffusers class this stands in for
    weights: str  # paths are relative to the artifact folder
    config: str
    constants: dict[str, ConstantSpec]
    transforms: dict[str, Any]  # fuse_qkv, channels_last, quantization (with torchao's config) as applied
    # "full": each variant's package is the whole component. "regional": the component runs eager from
    # ``weights`` (its state dict), each repeated block replaced by a compiled package of ``blocks``; the one
    # variant then records the shapes, inputs and errors of the whole component and has no package.
    variants: list[VariantEntry]
    build_seconds: float
    mode: str = "full"
    blocks: list[BlockEntry] = field(default_factory=list)
    compiler: dict[str, Any] = field(default_factory=dict)  # the inductor options the recipe chose, as applied
    method: str = "forward"  # the method of the eager module that the pipeline calls
    # What the eager method returns (with return_dict=True where it takes one), around the package's outputs:
    # see runtime/outputs.py. None: the package's one output, as it is.
    returns: Any = None
    # What the pipeline read from the eager module besides its config, dtype and device, recorded at capture:
    # attribute path -> value ("add_embedding.linear_1.in_features": 2816), and the diffusers mixins whose
    # methods it called (CacheMixin for Flux's cache_context).
    attributes: dict[str, Any] = field(default_factory=dict)
    mixins: list[str] = field(default_factory=list)
    # diffusers' step cache the recipe turns on at load ({"method": "first_block", "threshold": 0.08}); regional
    # components only, whose blocks the cache's hooks wrap.
    step_cache: dict[str, Any] | None = None

    @property
    def frozen(self) -> bool:
        """Built with the compiler option ``freezing``: each package holds the weights, folded into its code and
        prepacked for the build host's CPU; the weights file holds none and nothing is bound at load."""
        return bool(self.compiler.get("freezing"))

    @property
    def packages(self) -> list[str]:
        """Every compiled package of this component: its variants' (full) or its blocks' (regional)."""
        return [v.package for v in self.variants if v.package] + [b.package for b in self.blocks]


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Host:
    """What the compiled code depends on, recorded at build and compared with the loading host."""

    device: str  # "cpu" or "cuda"
    dtype: str
    platform: str  # "linux", "darwin", "windows"
    machine: str  # "x86_64", "aarch64"
    cpu_capability: str  # torch's name for the build host's vector ISA (informative)
    cpu_isa: str  # the recipe's CPU target: "native", "avx2" or "avx512"
    # CPU instruction-set extensions the compiled code may use (/proc/cpuinfo names): the loading host needs all.
    cpu_features: list[str]
    cuda: str | None  # CUDA version torch was built with
    gpu: str | None
    compute_capability: str | None  # "8.9"; CUDA builds only


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    versions: dict[str, str]  # diffbake, torch, diffusers, transformers, torchao, python
    host: Host
    source: dict[str, Any]  # model, kind, revision
    pipeline_class: str
    denoiser: str | None  # the pipeline attribute holding the denoiser ("unet", "transformer")
    pipeline: str  # folder of the eager components
    components: dict[str, ComponentEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.host.device

    @property
    def dtype(self) -> str:
        return self.host.dtype

    def require_rebindable(self, action: str) -> None:
        """The one rule on swapping weights: a frozen component's weights are compiled into its packages.

        Raises:
            RebindError: naming ``action``, the frozen components and the fix.
        """
        frozen = [name for name, entry in self.components.items() if entry.frozen]
        if frozen:
            raise RebindError(
                f"{action}: {', '.join(frozen)} {'was' if len(frozen) == 1 else 'were'} built with compiler "
                "freezing, which compiles the weights into the package, so no other weights can be bound to it; "
                "build the recipe with the new weights instead, or build without freezing to swap weights"
            )

    def to_json(self) -> str:
        return json.dumps(seal(asdict(self)), indent=2, sort_keys=False, allow_nan=False) + "\n"


DIGEST_KEY = "digest"


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content (every key but the digest), in a canonical JSON form."""
    body = {k: v for k, v in data.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its digest as the last key. The files are protected by their sha256 in the manifest, and the
    manifest by this digest of itself, so no edit of any file goes unnoticed."""
    return {**{k: v for k, v in data.items() if k != DIGEST_KEY}, DIGEST_KEY: content_digest(data)}


def flatten_call(names: list[str], kwargs: dict[str, Any]) -> list[Any]:
    """Pick the values named by ``names`` out of a (nested) keyword-argument dict; missing ones are None."""
    values = []
    for name in names:
        value: Any = kwargs
        for part in name.split(NAME_SEP):
            if isinstance(value, dict):
                value = value.get(part)
            elif isinstance(value, (tuple, list)) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]  # "image_rotary_emb.0": an item of a tuple argument
            else:
                value = None
        values.append(value)
    return values


def unflatten_call(names: list[str], values: list[Any], constants: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inverse of :func:`flatten_call`; ``constants`` (keyword path -> value) are the call's captured Python
    values, placed the same way."""
    constants = constants or {}
    kwargs: dict[str, Any] = {}
    for name, value in zip([*names, *constants], [*values, *constants.values()], strict=True):
        *parents, leaf = name.split(NAME_SEP)
        node = kwargs
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _tuples(kwargs)


def _tuples(node: Any) -> Any:
    # A nested dict whose keys are 0..n-1 was a tuple argument.
    if not isinstance(node, dict):
        return node
    node = {k: _tuples(v) for k, v in node.items()}
    if node and sorted(node) == [str(i) for i in range(len(node))]:
        return tuple(node[str(i)] for i in range(len(node)))
    return node


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(artifact: str | Path) -> Manifest:
    """Read and check an artifact's manifest.

    Raises:
        ArtifactNotFoundError: the folder or its manifest does not exist.
        ArtifactError: the manifest is not a diffbake manifest of a version this diffbake reads, or is malformed.
    """
    artifact = Path(artifact)
    path = artifact / MANIFEST_FILE
    if not artifact.is_dir():
        raise ArtifactNotFoundError(f"{artifact}: no such artifact folder; build one with `diffbake build RECIPE`")
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"{artifact}: no {MANIFEST_FILE} in this folder, so it is not a complete diffbake artifact "
            "(the manifest is written last; an interrupted build leaves none); rebuild it with `diffbake build RECIPE`"
        )
    if path.is_symlink():
        raise ArtifactError(f"{path}: is a symbolic link; an artifact holds regular files only; rebuild it")
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, where: str | Path) -> Manifest:
    """Check and convert a manifest's bytes; ``where`` names it in errors (a path, or a repo and folder).

    Raises:
        ArtifactError: not a diffbake manifest of a version this diffbake reads, or malformed.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{where}: more than the {MAX_MANIFEST_BYTES} bytes a manifest may have; rebuild the artifact"
        )
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_dupes)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ArtifactError(f"{where}: not a valid manifest ({reason}); rebuild the artifact") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(
            f"{where}: format is {_short(found)}, expected {FORMAT_NAME!r}: this is not a diffbake artifact"
        )
    if data.get("format_version") != FORMAT_VERSION:
        versions = data.get("versions")
        built_by = versions.get("diffbake") if isinstance(versions, dict) else None
        raise ArtifactError(
            f"{where}: format_version {_short(data.get('format_version'))}, but this diffbake reads version {FORMAT_VERSION}; "
            "rebuild the artifact with this diffbake, or load it with the diffbake that built it "
            f"({built_by if isinstance(built_by, str) else 'unknown'})"
        )
    # The digest is checked with the other files' hashes (verify_files, after the host checks), so that a
    # recorded fact that does not fit this host is reported by name even in a hand-edited manifest.
    data.pop(DIGEST_KEY, None)
    try:
        manifest = _convert(Manifest, data, "manifest")
        _check_manifest(manifest)
    except _SchemaError as e:
        raise ArtifactError(f"{where}: malformed manifest: {e}; rebuild the artifact") from None
    return manifest


def sealed(raw: bytes) -> bool:
    """Whether a manifest's bytes match the digest they were sealed with at build."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_dupes)
        return isinstance(data, dict) and data.get(DIGEST_KEY) == content_digest(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def check_seal(artifact: str | Path) -> None:
    """Check that the manifest's content matches the digest it was sealed with at build.

    Raises:
        IntegrityError: the manifest was changed after the build.
    """
    path = Path(artifact) / MANIFEST_FILE
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if not sealed(raw):
        raise IntegrityError(
            f"{path}: its content does not match the digest it was sealed with; the manifest was changed after "
            "the build; rebuild or re-download the artifact"
        )


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file, fsync, rename)."""
    path = Path(folder) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class _SchemaError(ValueError):
    pass


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = frozenset(
        f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return {f.name: hints[f.name] for f in fields}, required


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as an instance of the type ``tp``, checked strictly: no missing or unknown keys,
    no ``true`` where a number is expected, no float where an int is."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, where)
            except _SchemaError as e:
                errors.append(str(e))
        raise _SchemaError(errors[0] if len(errors) == 1 else f"{where}: {_kind(value)} fits none of its types")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _SchemaError(f"{where}: expected an object, found {_kind(value)}")
        fields, required = _fields(tp)
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise _SchemaError(f"{where}: unknown key {unknown[0]!r}")
        missing = sorted(required - set(value))
        if missing:
            raise _SchemaError(f"{where}: missing key {missing[0]!r}")
        return tp(**{k: _convert(fields[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin is list:
        if not isinstance(value, list):
            raise _SchemaError(f"{where}: expected an array, found {_kind(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _SchemaError(f"{where}: expected an object, found {_kind(value)}")
        _, item = typing.get_args(tp)
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise _SchemaError(f"{where}: expected null, found {_kind(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _SchemaError(f"{where}: expected a boolean, found {_kind(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _SchemaError(f"{where}: expected an integer, found {_kind(value)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _SchemaError(f"{where}: expected a finite number, found {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _SchemaError(f"{where}: expected a string, found {_kind(value)}")
        return value
    raise TypeError(f"no schema rule for {tp!r}")  # a bug in this module, not in the manifest


# What a tensor of a contract or a weights file may be: torch dtypes that safetensors stores (complex64: the
# rotary frequencies of Qwen-Image's and Z-Image's transformers).
DTYPES = frozenset(
    {
        "complex64",
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    }
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Dimension names and module paths: plain identifiers joined by dots, nothing a path or a shell could read.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise _SchemaError(message)


def _check_manifest(m: Manifest) -> None:
    """What the types alone do not say: known values, consistent names, and only files the manifest hashes."""
    _need("torch" in m.versions, "versions: no torch version recorded")
    _need(m.host.device in ("cpu", "cuda"), f"host.device: {m.host.device!r} is not 'cpu' or 'cuda'")
    _need(m.host.dtype in ("float32", "float16", "bfloat16"), f"host.dtype: {m.host.dtype!r} is not a build dtype")
    _need(_NAME.fullmatch(m.pipeline_class) is not None, f"pipeline_class: {m.pipeline_class!r} is not a class name")
    _need(m.denoiser is None or _NAME.fullmatch(m.denoiser) is not None, f"denoiser: {m.denoiser!r} is not a name")
    for rel in m.files:
        _check_relpath(rel, f"files: {rel!r}")
        _need(_SHA256.fullmatch(m.files[rel].sha256) is not None, f"files.{rel}.sha256: not a sha256 hex digest")
        _need(m.files[rel].size >= 0, f"files.{rel}.size: negative")
    _check_relpath(m.pipeline, "pipeline")
    _need(any(rel.startswith(m.pipeline + "/") for rel in m.files), f"pipeline: no file of {m.pipeline!r} is listed")
    _need(bool(m.components), "components: none")
    for name, c in m.components.items():
        _check_component(m, name, c)


def _listed(m: Manifest, rel: str, where: str) -> None:
    # Everything the loader opens must be hashed, or a change to it would go unnoticed.
    _check_relpath(rel, where)
    _need(rel in m.files, f"{where}: {rel!r} is not among the listed files")


def _check_component(m: Manifest, name: str, c: ComponentEntry) -> None:
    where = f"components.{name}"
    _need(name in KNOWN_COMPONENTS and c.name == name, f"{where}: unknown component (known: {KNOWN_COMPONENTS})")
    _need(c.mode in ("full", "regional"), f"{where}.mode: {c.mode!r} is not 'full' or 'regional'")
    _need(bool(c.variants), f"{where}.variants: none")
    _need(c.mode == "full" or (len(c.variants) == 1 and bool(c.blocks)), f"{where}: a regional build has blocks")
    _need(c.step_cache is None or _step_cache_ok(c), f"{where}.step_cache: a regional build's method and threshold")
    _listed(m, c.weights, f"{where}.weights")
    _listed(m, c.config, f"{where}.config")
    names = [c.method, *c.attributes, *c.mixins]
    _need(all(_NAME.fullmatch(n) for n in names), f"{where}: bad method, attribute or mixin name")
    for i, v in enumerate(c.variants):
        _need(
            bool(v.outputs) and (_returns_ok(c.returns, len(v.outputs)) or (c.returns is None and len(v.outputs) == 1)),
            f"{where}.returns: not a tree over variant {i + 1}'s {len(v.outputs)} outputs",
        )
    for key, spec in c.constants.items():
        _need(spec.dtype in DTYPES, f"{where}.constants.{key}.dtype: {spec.dtype!r} is not a known dtype")
        _need(
            all(n >= 0 for n in spec.shape) and _dense(spec.shape, spec.stride),
            f"{where}.constants.{key}: shape and stride do not fit",
        )
    for i, v in enumerate(c.variants):
        if c.mode == "full":
            _listed(m, v.package, f"{where}.variants[{i}].package")
        _check_variant(v, f"{where}.variants[{i}]")
    for j, b in enumerate(c.blocks):
        _listed(m, b.package, f"{where}.blocks[{j}].package")
        _need(all(_NAME.fullmatch(x) for x in b.instances), f"{where}.blocks[{j}].instances: bad module name")
        for spec in b.inputs:
            _need(spec.dtype in DTYPES, f"{where}.blocks[{j}]: input {spec.name!r} has unknown dtype")
            _need(all(isinstance(n, int) and n >= 0 for n in spec.shape), f"{where}.blocks[{j}]: bad shape")


def _check_variant(v: VariantEntry, vw: str) -> None:
    for d, dim in v.dims.items():
        _need(
            _NAME.fullmatch(d) is not None and _NAME.fullmatch(dim.base or d) is not None, f"{vw}.dims: bad name {d!r}"
        )
        _need(
            0 <= dim.min <= dim.max and dim.multiple >= 1 and dim.admits(dim.min) and dim.admits(dim.max),
            f"{vw}.dims.{d}: not a range",
        )
    for path in [*v.constants, *v.ignored]:
        _need(_NAME.fullmatch(path) is not None, f"{vw}: bad argument name {path!r}")
    for spec in [*v.inputs, *v.outputs]:
        _need(spec.dtype in DTYPES, f"{vw}: input {spec.name!r} has unknown dtype {spec.dtype!r}")
        _need(_NAME.fullmatch(spec.name) is not None, f"{vw}: bad input name {spec.name!r}")
        for size in spec.shape:
            ok = size in v.dims if isinstance(size, str) else size >= 0
            _need(ok, f"{vw}: input {spec.name!r} has size {size!r}, which is neither a size nor a dim")
    _need(set(v.self_test.sizes) == set(v.dims), f"{vw}.self_test.sizes: not the variant's dims")
    _need(
        all(v.dims[d].admits(n) for d, n in v.self_test.sizes.items()),
        f"{vw}.self_test.sizes: outside the variant's dims",
    )


def _step_cache_ok(c: ComponentEntry) -> bool:
    cache = c.step_cache or {}
    threshold = cache.get("threshold")
    return (
        c.mode == "regional"
        and set(cache) == {"method", "threshold"}
        and cache["method"] in STEP_CACHES
        and isinstance(threshold, float)
        and threshold > 0
    )


def _dense(shape: list[int], stride: list[int]) -> bool:
    """Whether ``stride`` lays ``shape`` out densely in some order of its dimensions (contiguous, channels_last):
    the layouts a constant is compiled for. Any other (a stride of 0, overlapping elements) cannot be copied into."""
    if len(stride) != len(shape) or any(s < 0 for s in stride):
        return False
    expected = 1
    for size, step in sorted(((n, s) for n, s in zip(shape, stride, strict=True) if n != 1), key=lambda d: d[1]):
        if step != expected:
            return False
        expected *= size
    return True


def _returns_ok(tree: Any, outputs: int) -> bool:
    """Whether ``tree`` is a well-formed output tree (runtime/outputs.py) using each of ``outputs`` once, in order."""
    seen: list[int] = []

    def ok(node: Any) -> bool:
        if not isinstance(node, dict):
            return node is None or isinstance(node, (bool, int, float, str))
        if set(node) == {"tensor"}:
            seen.append(node["tensor"])
            return isinstance(node["tensor"], int) and not isinstance(node["tensor"], bool)
        for kind in ("tuple", "list"):
            if set(node) == {kind}:
                return isinstance(node[kind], list) and all(ok(n) for n in node[kind])
        if set(node) == {"class", "args"} and isinstance(node["class"], str) and isinstance(node["args"], dict):
            return _NAME.fullmatch(node["class"]) is not None and all(ok(n) for n in node["args"].values())
        return False

    return isinstance(tree, dict) and ok(tree) and seen == list(range(outputs))


def _check_relpath(path: str, where: str) -> None:
    p = PurePosixPath(path)
    if (
        not path
        or p.is_absolute()
        or "\\" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
        or "\x00" in path
    ):
        raise _SchemaError(f"{where}: not a relative path inside the artifact")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out
