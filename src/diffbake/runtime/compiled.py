"""A compiled component: its variants (one AOTInductor package each), bound to one shared copy of its weights.

A call goes to the first variant whose compiled shapes fit (exact static variants first, then dynamic ones);
each variant checks every input first (:mod:`diffbake.runtime.guards`), because compiled code checks none.
Weights live here, not in the packages, so :meth:`CompiledComponent.bind` swaps them for every variant, and every
pipeline sharing the component (replicas) sees the swap.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbake.errors import ArtifactError, InputMismatchError
from diffbake.format.manifest import (
    ComponentEntry,
    Manifest,
    VariantEntry,
)
from diffbake.runtime.graphs import GraphReplay
from diffbake.runtime.guards import check_call, check_inputs, describe, resolve_device, torch_dtype
from diffbake.runtime.packages import Package
from diffbake.runtime.packages import unpack_dir as resolve_unpack_dir

logger = logging.getLogger(__name__)


__all__ = ["CompiledComponent"]


class CompiledComponent:
    """A component's compiled variants, bound to one shared copy of its weights, behind input guards.

    Args:
        artifact: the artifact folder.
        entry: the component's manifest entry.
        device: where the packages run ("cpu", "cuda", "cuda:1").
        unpack: where packages are extracted before loading (see :func:`diffbake.runtime.packages.unpack_dir`).
    """

    def __init__(
        self,
        artifact: Path,
        entry: ComponentEntry,
        device: str,
        unpack: Path | None = None,
        concurrency: int = 1,
        cuda_graphs: bool = False,
    ):
        from safetensors.torch import load_file

        self.concurrency = concurrency
        self.cuda_graphs = cuda_graphs
        self.entry = entry
        self.name = entry.name
        self.device = torch.device(resolve_device(device))
        self.unpack = unpack or resolve_unpack_dir()
        self.dtype = torch_dtype(entry.variants[0].outputs[0].dtype)
        # The artifact whose weights are bound now (set by diffbake.load; set_weights moves it with the weights).
        self.loaded_from: LoadedArtifact | None = None
        # What a refused call should also hear of the pipeline around this component (set by diffbake.load).
        self.call_note: str | None = None
        weights = load_file(artifact / entry.weights, device=str(self.device))
        check_weights(entry, weights)
        self.variants = [CompiledVariant(self, artifact, v) for v in entry.variants]
        # Exact static variants first, then dynamic ones, each in recipe order.
        self._order = sorted(self.variants, key=lambda v: v.entry.dynamic)
        if entry.frozen:
            self.weights = weights  # none: each package holds its own, folded into its code
        else:
            self.bind(weights)

    def bind(self, weights: dict[str, torch.Tensor], loaded_from: LoadedArtifact | None = None) -> None:
        """Bind ``weights`` to every variant: a pointer swap, no copy; every pipeline sharing this component sees it.

        ``weights`` must have passed :func:`check_weights` against this component's entry (names, shapes, dtypes,
        strides restored): the packages check none of it.
        """
        for variant in self.variants:
            variant.bind(weights)
        # user_managed: every variant's runner uses these tensors in place (one copy in memory), so they must
        # outlive the runners; we keep them here.
        self.weights = weights
        if loaded_from is not None:
            self.loaded_from = loaded_from

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.entry.variants[0].inputs]

    def __call__(self, values: list[Any], arguments: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Run the first variant (static ones first) whose shapes fit the inputs (and whose captured Python
        values fit ``arguments``, the call's arguments by name, where given)."""
        if len(self.variants) == 1:
            try:
                tensors = self.variants[0].check(values, arguments)
            except InputMismatchError as e:
                raise self._refusal(str(e)) from None
            return self.variants[0].run(tensors)
        reasons = []
        for variant in self._order:
            try:
                tensors = variant.check(values, arguments)
            except InputMismatchError as e:
                reasons.append(f"[{describe(variant.entry)}] {e}")
                continue
            return variant.run(tensors)
        raise self._refusal(f"{self.name}: no compiled variant fits this call: " + "; ".join(reasons))

    def _refusal(self, message: str) -> InputMismatchError:
        return InputMismatchError(message if self.call_note is None else f"{message} ({self.call_note})")


class CompiledVariant:
    """One AOTInductor package of a component, bound to the component's weights."""

    def __init__(self, component: CompiledComponent, artifact: Path, entry: VariantEntry):
        self.component = component
        self.name = component.name
        self.device = component.device
        self.entry = entry
        # The component binds its weights before the first call: a code-only package called without them crashes
        # the process, so the package must expect exactly the constants the manifest lists.
        self.runner = open_package(artifact / entry.package, self.device, component.unpack, component.concurrency)
        if not component.entry.frozen:
            require_same_names(
                f"{self.name}: {entry.package} expects constants that the manifest does not list",
                expected=self.runner.constant_names(),
                found=component.entry.constants,
            )
        # CUDA graphs replay fixed shapes; a dynamic variant's shapes change from call to call, so it runs as is.
        self.replay = self._new_replay() if component.cuda_graphs and not entry.dynamic else None
        if component.cuda_graphs and entry.dynamic:
            logger.info("%s: the dynamic-shape variant (%s) runs without CUDA graphs", self.name, describe(entry))

    def __call__(self, values: list[Any], arguments: dict[str, Any] | None = None) -> list[torch.Tensor]:
        return self.run(self.check(values, arguments))

    def _new_replay(self) -> GraphReplay:
        return GraphReplay(self.runner, self.device, f"{self.name} ({describe(self.entry)})")

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The package's outputs, in the order of the variant's ``outputs``."""
        if self.replay is not None:
            return self.replay(tensors)
        return list(self.runner(*tensors))

    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        """Bind weights (same names, shapes and dtypes); captured graphs hold the old addresses, so they go."""
        self.runner.bind(weights)
        if self.replay is not None:
            self.replay = self._new_replay()

    def check(self, values: list[Any], arguments: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Check every input against what was compiled (and the call's other arguments against the captured
        contract); returns the inputs as the package needs them."""
        if arguments is not None:
            check_call(self.name, self.entry, arguments)
        return check_inputs(self.name, self.entry, self.device, values)


def open_package(path: Path, device: torch.device, unpack: Path, runners: int = 1) -> Package:
    return Package(
        path,
        device.type,
        folder=unpack,
        machine=platform.machine(),
        device_index=device.index if device.index is not None else -1,
        runners=runners,
    )


def check_weights(entry: ComponentEntry, weights: dict[str, torch.Tensor]) -> None:
    """Check loaded weights against the manifest's constants, and restore each one's recorded layout in place.

    load_constants checks no shape, dtype or stride: a mismatch would compute garbage, so check them here.
    """
    specs = entry.constants
    require_same_names(
        f"{entry.name}: {entry.weights} does not hold the constants the manifest lists", expected=specs, found=weights
    )
    for key, spec in specs.items():
        t = weights[key]
        if list(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise ArtifactError(
                f"{entry.name}: constant {key!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                f"but the package was compiled for {spec.dtype} {spec.shape}; rebuild the artifact"
            )
        if list(t.stride()) != spec.stride:
            # safetensors stores tensors contiguous; restore the layout the package was compiled with.
            weights[key] = _restride(t, spec.stride)


def require_same_names(what: str, *, expected: Iterable[str], found: Iterable[str]) -> None:
    """The one check that two sets of tensor names agree (weights, manifest constants, a package's constants).

    Raises:
        ArtifactError: ``what``, then up to five missing and five unexpected names, and the fix.
    """
    expected, found = set(expected), set(found)
    if expected != found:
        missing, extra = sorted(expected - found)[:5], sorted(found - expected)[:5]
        raise ArtifactError(f"{what} (missing: {missing}, unexpected: {extra}); rebuild the artifact")


def _restride(t: torch.Tensor, stride: list[int]) -> torch.Tensor:
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


@dataclass(frozen=True)
class LoadedArtifact:
    """The artifact a compiled component's weights came from, and where it runs."""

    root: Path
    manifest: Manifest
    device: str
