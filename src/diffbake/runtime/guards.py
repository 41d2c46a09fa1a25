"""Input guards: what a call must look like to run compiled code, in one place for every compiled path.

AOTInductor code checks none of its inputs: a wrong shape, dtype, device or memory layout runs and returns wrong
numbers. The full-graph variants and the regional blocks both check their inputs here before they run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from diffbake.errors import ArtifactError, InputMismatchError
from diffbake.format.manifest import (
    TensorSpec,
    VariantEntry,
)


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in the manifest; rebuild the artifact")
    return dtype


def fmt_range(size: int | list[int]) -> str:
    return f"{size[0]}..{size[1]}" if isinstance(size, list) else str(size)


def describe(variant: VariantEntry) -> str:
    s = variant.shapes
    text = f"{fmt_range(s['batch'])} image(s) per call at {fmt_range(s['height'])}x{fmt_range(s['width'])} pixels"
    if s.get("text_tokens"):
        text += f", {fmt_range(s['text_tokens'])} text tokens"
    if variant.cfg:
        text += ", with classifier-free guidance"
    elif variant.cfg is False:
        text += ", without classifier-free guidance"
    return text


def bind_call(
    where: str, signature: inspect.Signature, owner: Any, names: list[str], args: tuple, kwargs: dict
) -> dict[str, Any]:
    """Bind a call to the eager signature; refuse arguments that change the result but were not compiled."""
    bound = signature.bind(owner, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    compiled = {name.split(".")[0] for name in names}
    for name, value in arguments.items():
        default = signature.parameters[name].default
        # None, the default, or an empty kwargs dict (Flux passes joint_attention_kwargs={}) change nothing.
        unused = value is None or value is default or (isinstance(value, dict) and not value) or value == default
        if name not in compiled and name != "return_dict" and not unused:
            raise InputMismatchError(
                f"{where}: argument {name!r} is not part of the compiled code (it was compiled for "
                f"{', '.join(names)}); call without it"
            )
    return arguments


def resolve_device(device: str) -> str:
    """``device`` with its index: a bare "cuda" is the current CUDA device, so that guards and host facts name
    the one GPU that runs the code."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


def check_tensor(
    where: str,
    spec: TensorSpec,
    value: Any,
    device: torch.device,
    shape_problem: Callable[[torch.Tensor], str | None],
) -> torch.Tensor:
    """The input check every compiled path runs (full-graph variants and regional blocks alike): a tensor, of a
    shape that ``shape_problem`` accepts (it returns the message otherwise), of the compiled dtype, on the device
    the code runs on; returned in the memory layout the code was compiled for.

    Raises:
        InputMismatchError: saying what differs, what was compiled, and what to call instead.
    """
    if value is None:
        raise InputMismatchError(f"{where} is required by the compiled code, but the call passed none")
    if not torch.is_tensor(value):
        raise InputMismatchError(f"{where} must be a tensor, found {type(value).__name__}")
    problem = shape_problem(value)
    if problem is not None:
        raise InputMismatchError(problem)
    if value.dtype != torch_dtype(spec.dtype):
        raise InputMismatchError(
            f"{where} has dtype {str(value.dtype).removeprefix('torch.')}, but this artifact was compiled for "
            f"{spec.dtype}; load the pipeline with its own dtype (diffbake.load does) and do not cast it"
        )
    if value.device != device:
        # Never moved silently: a copy per call would hide a pipeline split across devices.
        raise InputMismatchError(
            f"{where} is on {value.device}, but this artifact runs on {device}; keep the pipeline on {device}"
        )
    # A package compiled for contiguous inputs returns wrong numbers for other strides: make it what was compiled.
    return value.contiguous()
