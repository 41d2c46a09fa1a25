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

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ArtifactNotFoundError

FORMAT_NAME = "diffbake-artifact"
FORMAT_VERSION = 1

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
    layout: str = "contiguous"


@dataclass(frozen=True)
class DimSpec:
    """A dynamic dimension: every value in [min, max] that is a multiple of ``multiple``."""

    min: int
    max: int
    multiple: int = 1

    def admits(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple == 0


@dataclass(frozen=True)
class ConstantSpec:
    shape: list[int]
    dtype: str
    stride: list[int]


@dataclass(frozen=True)
class VariantEntry:
    """One compiled package of a component; all variants of a component share its weights."""

    package: str
    shapes: dict[str, int | list[int]]  # the recipe's shapes: images per call, pixels, tokens; [min, max] ranges
    cfg: bool | None
    inputs: list[TensorSpec]
    dims: dict[str, DimSpec]
    output: TensorSpec
    max_abs_error: float  # compiled vs the eager component it was compiled from (same dtype and transforms)
    tolerance: float
    error_vs_float32: float  # compiled vs the float32 eager component without transforms

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


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    versions: dict[str, str]  # diffbake, torch, diffusers, transformers, torchao, python
    host: dict[str, Any]  # device, dtype, cpu_capability, platform, machine, cuda, gpu
    source: dict[str, Any]  # model, revision, family
    pipeline_class: str
    pipeline: str  # folder of the eager components
    components: dict[str, ComponentEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.host["device"]

    @property
    def dtype(self) -> str:
        return self.host["dtype"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, allow_nan=False) + "\n"


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


def unflatten_call(names: list[str], values: list[Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_call`."""
    kwargs: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path}: {path.stat().st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have"
        )
    try:
        data = json.loads(
            path.read_text(encoding="utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_dupes
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not a valid manifest ({e}); rebuild the artifact") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{path}: format is {found!r}, expected {FORMAT_NAME!r}: this is not a diffbake artifact")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {data.get('format_version')!r}, but this diffbake reads version {FORMAT_VERSION}; "
            "rebuild the artifact with this diffbake, or load it with the diffbake that built it "
            f"({data.get('versions', {}).get('diffbake', 'unknown')})"
        )
    try:
        return _manifest_from_dict(data)
    except (TypeError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e}); rebuild the artifact") from e


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


def _manifest_from_dict(data: dict[str, Any]) -> Manifest:
    data = dict(data)
    components = {}
    for name, c in data.pop("components").items():
        c = dict(c)
        c["constants"] = {k: ConstantSpec(**v) for k, v in c["constants"].items()}
        variants = []
        for v in c["variants"]:
            v = dict(v)
            v["inputs"] = [TensorSpec(**i) for i in v["inputs"]]
            v["output"] = TensorSpec(**v["output"])
            v["dims"] = {k: DimSpec(**d) for k, d in v["dims"].items()}
            variants.append(VariantEntry(**v))
        if not variants:
            raise ValueError(f"component {name!r} has no variants")
        c["variants"] = variants
        blocks = []
        for b in c.get("blocks", []):
            b = dict(b)
            b["inputs"] = [TensorSpec(**i) for i in b["inputs"]]
            blocks.append(BlockEntry(**b))
        c["blocks"] = blocks
        if c.get("mode", "full") not in ("full", "regional"):
            raise ValueError(f"component {name!r} has unknown mode {c['mode']!r}")
        components[name] = ComponentEntry(**c)
    files = {_safe_relpath(k): FileEntry(**v) for k, v in data.pop("files").items()}
    return Manifest(**data, components=components, files=files)


def _safe_relpath(path: str) -> str:
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"file path {path!r} is not a relative path inside the artifact")
    return path


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out
