"""Loading a regionally compiled component: the eager module, with each repeated block's forward running the
package compiled for its group, bound to that block's own parameters (no copy)."""

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
    """Replaces one block instance's ``forward``: checks the inputs, runs the group's package on its weights."""

    def __init__(self, component: str, fqn: str, block: torch.nn.Module, entry: BlockEntry, runner: Any, built: str):
        self.where = f"{component}: block {fqn!r}"
        self.built = built
        self.entry = entry
        self.signature = inspect.signature(type(block).forward)
        self.block = block
        self.runner = runner
        self.device = next(iter(block.parameters())).device
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
    """A regionally compiled component: the eager module whose repeated blocks run compiled code that reads the
    module's own parameters in place, so binding other weights is copying them into those parameters."""

    def __init__(self, module: torch.nn.Module, entry: ComponentEntry, device: torch.device):
        self.module = module
        self.entry = entry
        self.name = entry.name
        self.device = device
        self.loaded_from: LoadedArtifact | None = None

    def check_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Check that ``weights`` (passed through :func:`check_weights`) is this module's state dict."""
        require_same_names(
            f"{self.name}: {self.entry.weights} does not hold the state dict of {self.entry.class_name} with this "
            "config",
            expected=self.module.state_dict(),
            found=weights,
        )

    def bind(self, weights: dict[str, torch.Tensor], loaded_from: LoadedArtifact | None = None) -> None:
        """Copy checked ``weights`` into the module's parameters, which the compiled blocks read in place."""
        self.module.load_state_dict(weights, strict=True)
        if loaded_from is not None:
            self.loaded_from = loaded_from


# Eager classes a regional artifact may rebuild from its config (never a class named by the artifact alone).
REGIONAL_CLASSES = ("UNet2DConditionModel", "FluxTransformer2DModel")


def load_regional(
    artifact: str | Path, entry: ComponentEntry, device: str, unpack: Path | None = None, concurrency: int = 1
) -> torch.nn.Module:
    """Rebuild a regionally compiled component: the eager module from its config and weights, each repeated
    block's forward replaced by its group's compiled package bound to that block's own weights (no copy)."""
    import diffusers
    from safetensors.torch import load_file

    artifact = Path(artifact)
    if entry.class_name not in REGIONAL_CLASSES:
        raise ArtifactError(f"{entry.name}: regional class {entry.class_name!r} is not one of {REGIONAL_CLASSES}")
    config = json.loads((artifact / entry.config).read_text(encoding="utf-8"))
    with torch.device("meta"):
        module = getattr(diffusers, entry.class_name).from_config(config)
    weights = load_file(artifact / entry.weights, device=str(torch.device(device)))
    check_weights(entry, weights)
    component = RegionalComponent(module, entry, torch.device(resolve_device(device)))
    component.check_state(weights)
    module.load_state_dict(weights, strict=True, assign=True)
    module.eval().requires_grad_(False)
    unpack = unpack or resolve_unpack_dir()
    for block_entry in entry.blocks:
        for fqn in block_entry.instances:
            try:
                block = module.get_submodule(fqn)
            except AttributeError:
                raise ArtifactError(
                    f"{entry.name}: block {fqn!r} is not part of {entry.class_name}; rebuild the artifact"
                ) from None
            runner = open_package(artifact / block_entry.package, torch.device(device), unpack, concurrency)
            names = runner.constant_names()
            state = {f"block.{k}": v for k, v in block.state_dict(keep_vars=True).items()}
            if not set(names) <= set(state):
                raise ArtifactError(
                    f"{entry.name}: {block_entry.package} does not fit block {fqn!r}; rebuild the artifact"
                )
            # user_managed: the package reads the block's own parameters in place; nothing is copied.
            runner.bind({n: state[n].detach() for n in names})
            block.forward = CompiledBlock(entry.name, fqn, block, block_entry, runner, describe(entry.variants[0]))
    if hasattr(module, "enable_cache"):
        module.enable_cache = _block_level_only(entry.name, module, module.enable_cache)
    module.diffbake_components = {entry.name: component}
    return module


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
