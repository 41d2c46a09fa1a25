"""Regional compilation: compile each distinct repeated block once, and reuse it for every instance.

diffusers models list their repeated blocks in ``_repeated_blocks`` (the UNet's ``BasicTransformerBlock``,
Flux's two transformer blocks). Instances of one class can still differ (in a real SD UNet the blocks differ in
width and sequence length), so blocks are grouped by class, weight shapes and input shapes; each group is
exported and compiled from its first instance, and at load every instance binds its own weights to its group's
package. The rest of the model runs eager. Compile time grows with the number of distinct blocks, not depth.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffbake.errors import BuildError
from diffbake.format.manifest import TensorSpec, unflatten_call


@dataclass
class BlockGroup:
    class_name: str
    instances: list[str]
    names: list[str]  # flat input names, as in manifest.flatten_call
    example: list[torch.Tensor]  # the first instance's inputs, as captured from a real forward
    outputs: int  # 0: one tensor; n: a tuple of n tensors
    specs: list[TensorSpec] = field(default_factory=list)
    nones: list[str] = field(default_factory=list)  # required arguments the model passed as None


class BlockCall(torch.nn.Module):
    """``block(**kwargs)`` with the kwargs as a flat positional list (and ``nones`` as None); always returns a
    tuple of tensors."""

    def __init__(self, block: torch.nn.Module, names: list[str], nones: list[str] = ()):
        super().__init__()
        self.block = block
        self.names = names
        self.nones = list(nones)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.block(**dict.fromkeys(self.nones), **unflatten_call(self.names, list(args)))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def flatten_arguments(
    where: str, signature: inspect.Signature, arguments: dict[str, Any]
) -> tuple[list, list, list[str]]:
    """Tensors of a block call, named by keyword path, and the required arguments passed as None (Z-Image's
    ``attn_mask``); other Nones, defaults and empty dicts are left out."""
    names, values, nones = [], [], []
    for name, value in arguments.items():
        if value is None and signature.parameters[name].default is inspect.Parameter.empty:
            nones.append(name)
        if torch.is_tensor(value):
            names.append(name)
            values.append(value)
        elif isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
            names += [f"{name}.{i}" for i in range(len(value))]
            values += list(value)
        elif isinstance(value, dict) and all(torch.is_tensor(v) for v in value.values()):
            names += [f"{name}.{k}" for k in value]
            values += list(value.values())
        elif value is not None and value != signature.parameters[name].default:
            raise BuildError(f"{where}: argument {name!r} = {value!r} is not a tensor and cannot be compiled")
    return names, values, nones


def repeated_blocks(name: str, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The instances of the classes a diffusers model lists in ``_repeated_blocks``, by qualified name.

    Raises:
        BuildError: the model declares none.
    """
    classes = set(getattr(module, "_repeated_blocks", None) or ())
    blocks = {fqn: sub for fqn, sub in module.named_modules() if type(sub).__name__ in classes}
    if not blocks:
        raise BuildError(
            f"{name}: {type(module).__name__} declares no repeated blocks (_repeated_blocks) to compile regionally; "
            "use mode = 'full'"
        )
    return blocks


def capture_blocks(name: str, module: torch.nn.Module, run: Callable[[], Any]) -> list[BlockGroup]:
    """Run ``run()`` (a forward of ``module``) and group the repeated blocks it calls by class and shapes.

    Raises:
        BuildError: the model declares no repeated blocks, or one was never called.
    """
    blocks = repeated_blocks(name, module)
    calls: dict[str, tuple[list, list, list[str]]] = {}
    arity: dict[str, int] = {}

    def before(fqn: str, sub: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if fqn not in calls:
            signature = inspect.signature(type(sub).forward)
            bound = signature.bind(sub, *args, **kwargs).arguments
            bound.pop(next(iter(signature.parameters)))
            names, values, nones = flatten_arguments(f"{name}: block {fqn}", signature, bound)
            calls[fqn] = (names, [v.detach().clone() for v in values], nones)

    def after(fqn: str, sub: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        arity.setdefault(fqn, len(out) if isinstance(out, (tuple, list)) else 0)

    handles = []
    for fqn, sub in blocks.items():
        handles.append(sub.register_forward_pre_hook(lambda m, a, k, f=fqn: before(f, m, a, k), with_kwargs=True))
        handles.append(sub.register_forward_hook(lambda m, a, k, o, f=fqn: after(f, m, a, k, o), with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [fqn for fqn in blocks if fqn not in calls]
    if missing:
        raise BuildError(f"{name}: repeated blocks {missing[:3]} were not called by a forward; use mode = 'full'")

    groups: dict[tuple, BlockGroup] = {}
    for fqn, sub in blocks.items():
        names, values, nones = calls[fqn]
        key = (
            type(sub).__name__,
            tuple(nones),
            tuple((k, tuple(t.shape), t.dtype) for k, t in sub.state_dict().items()),
            tuple((n, tuple(v.shape), v.dtype) for n, v in zip(names, values, strict=True)),
        )
        if key in groups:
            groups[key].instances.append(fqn)
        else:
            specs = [
                TensorSpec(n, list(v.shape), str(v.dtype).removeprefix("torch."))
                for n, v in zip(names, values, strict=True)
            ]
            groups[key] = BlockGroup(type(sub).__name__, [fqn], names, values, arity[fqn], specs, nones)
    return list(groups.values())
