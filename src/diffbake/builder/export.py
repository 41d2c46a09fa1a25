"""torch.export of one component, called exactly as the pipeline calls it.

The package takes a flat list of tensors; :class:`FlatCall` maps that list back onto the module's keyword
arguments (nested ones included, e.g. SDXL's ``added_cond_kwargs``), adds the Python values the pipeline
passed (its captured constants), and returns the first output tensor.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from diffbake.errors import BuildError
from diffbake.format.manifest import DimSpec, TensorSpec, unflatten_call
from diffbake.runtime.outputs import flatten_output


class FlatCall(torch.nn.Module):
    """``module.method(**kwargs)`` with the tensors given as a flat positional list and the call's Python values
    (``constants``, by keyword path) fixed; returns every tensor of the result, flat. ``returns`` is then the tree
    they sat in (runtime/outputs.py), with ``return_dict=True`` where the method takes it (an output class)."""

    def __init__(
        self,
        module: torch.nn.Module,
        method: str,
        names: list[str],
        constants: dict[str, Any] | None = None,
        lists: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.model = module
        self.method = method
        self.names = names
        self.constants = dict(constants or {})
        self.lists = lists  # arguments passed as lists (see Contract.lists)
        self.returns: Any = None
        self.takes_return_dict = "return_dict" in inspect.signature(getattr(module, method)).parameters

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = unflatten_call(self.names, list(args), self.constants)
        kwargs.update({k: list(kwargs[k]) for k in self.lists if isinstance(kwargs.get(k), tuple)})
        if self.takes_return_dict:
            kwargs["return_dict"] = True
        try:
            self.returns, tensors = flatten_output(getattr(self.model, self.method)(**kwargs))
        except ValueError as e:
            raise BuildError(
                f"{type(self.model).__name__}.{self.method} returns {e}, which compiled code cannot return; keep "
                "this component eager"
            ) from None
        return tuple(tensors)


def dynamic_shapes(specs: list[TensorSpec], dims: dict[str, DimSpec]) -> dict[str, Any] | None:
    """torch.export's dynamic_shapes for a flat call: one Dim per index (a recipe size, see DimSpec), and every
    dimension that follows it as ``multiple * Dim + offset``, so export proves the relations instead of
    specializing the sizes."""
    if not dims:
        return None
    bases: dict[str, Any] = {}
    objects = {}
    for name, d in dims.items():
        base = d.base or name
        if base not in bases:
            bases[base] = torch.export.Dim(base, min=d.index(d.min), max=d.index(d.max))
        objects[name] = bases[base] if (d.multiple, d.offset) == (1, 0) else d.multiple * bases[base] + d.offset
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
            exported = torch.export.export(flat, tuple(example), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many unrelated types; all mean the same to the user
        factors = dict((n, int(k)) for n, k in _SUGGESTED.findall(str(e)))
        if factors:
            raise NeedsMultiple(factors, _violation(str(e))) from e
        raise BuildError(
            f"{name}: torch.export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "set DIFFBAKE_DEBUG=1 for the traceback"
        ) from e
    return constants_as_buffers(exported)


def constants_as_buffers(exported: Any) -> Any:
    """Make the tensors the model creates in its code (``torch.tensor(...)`` in a forward, lifted by export as
    constants) non-persistent buffers, in place: AOTInductor then names them in the package as export does, and
    the weights file can hold them. Left as constants, AOTInductor re-traces them as anonymous attributes
    (``_tensor_constant0``) whose export names are lost (Chroma's, Z-Image's and Qwen-Image's transformers)."""
    from torch.export.graph_signature import InputKind

    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.CONSTANT_TENSOR:
            spec.kind, spec.persistent = InputKind.BUFFER, False
    return exported


# torch.export's fix for a dimension the model needs in steps: "  height = 2*_height", or "height = 8*_height - 4"
# when the example took a branch for sizes off the step (a UNet that pads odd sizes): the step is what counts,
# and with the range on it the example traces the branch for sizes on it.
_SUGGESTED = re.compile(r"^\s*(\w+) = (\d+)\*_\w+(?: [+-] \d+)?\s*$", re.MULTILINE)


class NeedsMultiple(Exception):
    """The model needs these dimension indices (``Dim`` names) to be multiples of these factors."""

    def __init__(self, factors: dict[str, int], reason: str):
        super().__init__(reason)
        self.factors = factors
        self.reason = reason


def _violation(message: str) -> str:
    line = next((ln.strip(" -") for ln in message.splitlines() if "satisfy the generated guard" in ln), "")
    return line or message.splitlines()[0]
