"""torch.export of one component, called exactly as the pipeline calls it.

The package takes a flat list of tensors; :class:`FlatCall` maps that list back onto the module's keyword
arguments (nested ones included, e.g. SDXL's ``added_cond_kwargs``) and returns the first output tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from diffbake.errors import BuildError
from diffbake.format.manifest import DimSpec, TensorSpec, unflatten_call


class FlatCall(torch.nn.Module):
    """``module.method(**kwargs, return_dict=False)[0]`` with the kwargs given as a flat positional list."""

    def __init__(self, module: torch.nn.Module, method: str, names: list[str]):
        super().__init__()
        self.model = module
        self.method = method
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = unflatten_call(self.names, list(args))
        return getattr(self.model, self.method)(**kwargs, return_dict=False)[0]


def dynamic_shapes(specs: list[TensorSpec], dims: dict[str, DimSpec]) -> dict[str, Any] | None:
    """torch.export's dynamic_shapes for a flat call: one Dim per named dimension, shared across inputs."""
    if not dims:
        return None
    objects = {}
    for name, d in dims.items():
        if d.multiple > 1:
            # A multiple of k is k * Dim: export then proves divisibility instead of specializing the size.
            objects[name] = d.multiple * torch.export.Dim(
                f"{name}_div{d.multiple}", min=d.min // d.multiple, max=d.max // d.multiple
            )
        else:
            objects[name] = torch.export.Dim(name, min=d.min, max=d.max)
    per_input = tuple(
        {i: objects[size] for i, size in enumerate(spec.shape) if isinstance(size, str)} or None for spec in specs
    )
    return {"args": per_input}


def export_component(
    name: str, flat: FlatCall, example: list[torch.Tensor], shapes: dict[str, Any] | None = None
) -> Any:
    """Export, with the given dynamic shapes if any; a failure names the component.

    Raises:
        BuildError: torch.export could not trace the component.
    """
    try:
        with torch.no_grad():
            return torch.export.export(flat, tuple(example), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many unrelated types; all mean the same to the user
        raise BuildError(
            f"{name}: torch.export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "set DIFFBAKE_DEBUG=1 for the traceback"
        ) from e
