"""Loading a regionally compiled component: the eager module, with each repeated block's forward running the
package compiled for its group, bound to that block's own constants (no copy).

The weights file holds what runs: the module's state outside the blocks, and each block instance's package
constants. Without transforms those are the block's own parameters, assigned to the module as usual. With QKV
fusion the module is fused (diffusers' ``fuse_qkv_projections``, as at build) and the unfused projections, which
no compiled block reads, are not stored and are removed from the blocks; with quantization the blocks' packages
read the quantized data and scales, and the float linears they replace are removed as well.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from diffbake.errors import ArtifactError, InputMismatchError
from diffbake.format.manifest import (
    BlockEntry,
    ComponentEntry,
    TensorSpec,
    flatten_call,
)
from diffbake.runtime.compiled import LoadedArtifact, check_weights, open_package, require_same_names
from diffbake.runtime.guards import bind_call, check_tensor, describe, resolve_device
from diffbake.runtime.packages import unpack_dir as resolve_unpack_dir


class CompiledBlock:
    """Replaces one block instance's ``forward``: checks the inputs, runs the group's package on its constants."""

    def __init__(
        self,
        component: str,
        fqn: str,
        block: torch.nn.Module,
        entry: BlockEntry,
        runner: Any,
        built: str,
        device: torch.device,
    ):
        self.where = f"{component}: block {fqn!r}"
        self.built = built
        self.entry = entry
        self.signature = inspect.signature(type(block).forward)
        self.block = block
        self.runner = runner
        self.device = device
        self.names = [spec.name for spec in entry.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = self.names
        arguments = bind_call(self.where, self.signature, self.block, names, args, kwargs)
        tensors = []
        for spec, value in zip(self.entry.inputs, flatten_call(names, arguments), strict=True):
            where = f"{self.where}: input {spec.name!r}"
            tensors.append(
                check_tensor(where, spec, value, self.device, lambda t, s=spec, w=where: self._shape(w, s, t))
            )
        out = self.runner(*tensors)
        return tuple(out) if self.entry.outputs else out[0]

    def _shape(self, where: str, spec: TensorSpec, value: torch.Tensor) -> str | None:
        if list(value.shape) == spec.shape:
            return None
        return (
            f"{where} is {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}, but it was compiled for "
            f"{spec.dtype} {tuple(spec.shape)} ({self.built}); a regional build runs exactly these shapes: call the "
            "pipeline with them, or rebuild with the shapes of this call"
        )


class RegionalComponent:
    """A regionally compiled component: the eager module whose repeated blocks run compiled code. Every tensor of
    the weights file is in use, read in place (by the eager module, or by a block's package), so binding other
    weights is copying them into those tensors."""

    def __init__(
        self, module: torch.nn.Module, entry: ComponentEntry, device: torch.device, tensors: dict[str, torch.Tensor]
    ):
        self.module = module
        self.entry = entry
        self.name = entry.name
        self.device = device
        self.tensors = tensors
        self.loaded_from: LoadedArtifact | None = None

    def bind(self, weights: dict[str, torch.Tensor], loaded_from: LoadedArtifact | None = None) -> None:
        """Copy ``weights`` into the tensors the module and the compiled blocks read in place. Their names are
        this component's: :func:`check_weights` checked them against a manifest whose constants are the loaded
        one's (``set_weights`` takes only a rebind of the same compiled code)."""
        with torch.no_grad():
            for key, tensor in self.tensors.items():
                tensor.copy_(weights[key])
        if loaded_from is not None:
            self.loaded_from = loaded_from


def regional_class(name: str, class_name: str) -> type:
    """The eager class a regional artifact rebuilds from its config: a diffusers model class (never one the
    artifact could bring) that lists its repeated blocks.

    Raises:
        ArtifactError: ``class_name`` is not such a class.
    """
    import diffusers

    cls = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and getattr(cls, "_repeated_blocks", None)):
        raise ArtifactError(
            f"{name}: regional class {class_name!r} is not a diffusers model that lists repeated blocks "
            "(_repeated_blocks); rebuild the artifact with mode = 'full'"
        )
    return cls


def load_regional(
    artifact: str | Path, entry: ComponentEntry, device: str, unpack: Path | None = None, concurrency: int = 1
) -> torch.nn.Module:
    """Rebuild a regionally compiled component: the eager module from its config and weights, each repeated
    block's forward replaced by its group's compiled package bound to that block's constants (no copy)."""
    from safetensors.torch import load_file

    artifact = Path(artifact)
    cls = regional_class(entry.name, entry.class_name)
    config = json.loads((artifact / entry.config).read_text(encoding="utf-8"))
    with torch.device("meta"):
        module = cls.from_config(config)
    if entry.transforms.get("fuse_qkv"):
        module.fuse_qkv_projections()  # the structure the blocks were compiled with (no weight exists yet)
    weights = load_file(artifact / entry.weights, device=str(torch.device(device)))
    check_weights(entry, weights)
    blocks = {fqn: block_entry for block_entry in entry.blocks for fqn in block_entry.instances}
    for fqn in blocks:
        try:
            module.get_submodule(fqn)
        except AttributeError:
            raise ArtifactError(
                f"{entry.name}: block {fqn!r} is not part of {entry.class_name}; rebuild the artifact"
            ) from None
    inside = tuple(f"{fqn}." for fqn in blocks)
    state = module.state_dict()
    require_same_names(
        f"{entry.name}: {entry.weights} does not hold the state of {entry.class_name} outside its compiled blocks",
        expected=[k for k in state if not k.startswith(inside)],
        found=[k for k in weights if not k.startswith(inside)],
    )
    # Assigned, not copied: the module's parameters are the loaded tensors, as the blocks' constants are.
    module.load_state_dict({k: v for k, v in weights.items() if k in state}, strict=False, assign=True)
    module.eval().requires_grad_(False)
    unpack = unpack or resolve_unpack_dir()
    target = torch.device(resolve_device(device))
    for fqn, block_entry in blocks.items():
        block = module.get_submodule(fqn)
        runner = open_package(artifact / block_entry.package, torch.device(device), unpack, concurrency)
        constants = {n: weights.get(f"{fqn}.{n.removeprefix('block.')}") for n in runner.constant_names()}
        if any(t is None for t in constants.values()):
            raise ArtifactError(f"{entry.name}: {block_entry.package} does not fit block {fqn!r}; rebuild the artifact")
        # user_managed: the package reads these tensors in place; the component's tensors (all of ``weights``)
        # keep them alive as long as the module.
        runner.bind(constants)
        built = describe(entry.variants[0])
        block.forward = CompiledBlock(entry.name, fqn, block, block_entry, runner, built, target)
        _drop_unloaded(block)
    left = [k for k, t in module.state_dict().items() if t.is_meta]
    if left:
        raise ArtifactError(
            f"{entry.name}: {entry.weights} holds no value for {left[:3]} (and {len(left)} in all); rebuild the "
            "artifact"
        )
    component = RegionalComponent(module, entry, target, weights)
    if hasattr(module, "enable_cache"):
        module.enable_cache = _block_level_only(entry.name, module, module.enable_cache)
    module.diffbake_components = {entry.name: component}
    return module


def _drop_unloaded(block: torch.nn.Module) -> None:
    """Remove what the weights file left on the meta device inside a compiled block: the tensors the compiled code
    replaced (unfused projections, the float weights of quantized linears), and the submodules left empty."""
    emptied: set[str] = set()
    for fqn, sub in reversed(list(block.named_modules())):  # children before their parents
        for table in (sub._parameters, sub._buffers):
            for key in [k for k, t in table.items() if t is not None and t.is_meta]:
                del table[key]
                emptied.add(fqn)
        if fqn and fqn in emptied and next(iter([*sub.parameters(), *sub.buffers()]), None) is None:
            parent, _, child = fqn.rpartition(".")
            delattr(block.get_submodule(parent) if parent else block, child)
            emptied.add(parent)


def _block_level_only(component: str, module: torch.nn.Module, enable_cache: Any) -> Any:
    """``module.enable_cache`` that refuses a cache hooking modules inside a compiled block.

    A compiled block runs as one call and never calls its submodules, so a hook on one of them (TaylorSeer's
    default hooks each block's attention) would never run: the cache would silently do nothing.
    """
    blocks = tuple(fqn for fqn, sub in module.named_modules() if isinstance(sub.forward, CompiledBlock))

    def hooked() -> set[str]:
        return {
            fqn
            for fqn, sub in module.named_modules()
            if getattr(getattr(sub, "_diffusers_hook", None), "hooks", None)
            and any(fqn.startswith(f"{block}.") for block in blocks)
        }

    def checked(config: Any) -> None:
        before = hooked()
        enable_cache(config)
        inside = sorted(hooked() - before)
        if inside:
            module.disable_cache()
            block = next(b for b in blocks if inside[0].startswith(f"{b}."))
            more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
            raise InputMismatchError(
                f"{component}: {type(config).__name__} hooks {inside[0]!r}{more}, inside the compiled block "
                f"{block!r}, which runs as one compiled call and never calls its submodules, so the cache would do "
                "nothing; use a cache that hooks whole blocks (FirstBlockCacheConfig, MagCacheConfig, or "
                "TaylorSeerCacheConfig(use_lite_mode=True) or with cache_identifiers naming whole blocks)"
            )

    return checked
