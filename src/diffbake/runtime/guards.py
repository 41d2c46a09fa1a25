"""Input guards: what a call must look like to run compiled code, in one place for every compiled path.

AOTInductor code checks none of its inputs: a wrong shape, dtype, device or memory layout runs and returns wrong
numbers. The full-graph variants and the regional blocks both check their inputs here before they run.
"""

from __future__ import annotations

import inspect
import math
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
    if s.get("image_height"):
        text += f", from an input image of {_image_size(s)} pixels"
    if variant.cfg:
        text += ", with classifier-free guidance"
    elif variant.cfg is False:
        text += ", without classifier-free guidance"
    return text


def _image_size(s: dict[str, Any]) -> str:
    """The input image's own size (height x width), where the recipe gives it one."""
    return f"{fmt_range(s['image_height'])}x{fmt_range(s['image_width'])}"


def call_leaves(arguments: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A call's arguments as (keyword path, value) leaves: nested dicts by key ("added_cond_kwargs.time_ids"),
    sequences holding tensors by index ("image_rotary_emb.0"); anything else is one leaf. The build records a
    call's contract from these leaves and the stand-ins check calls against it, with this one function."""
    out: list[tuple[str, Any]] = []
    for key, value in arguments.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out += call_leaves(value, path + ".")
        elif isinstance(value, (tuple, list)) and any(torch.is_tensor(v) for v in value):
            out += call_leaves({str(i): v for i, v in enumerate(value)}, path + ".")
        else:
            out.append((path, value))
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON (tuples as lists), or a ValueError if it is not a plain value: how a call's Python
    values are recorded at build and compared at run time."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v) for k, v in value.items()}
    raise ValueError(f"a {type(value).__name__}")


def _nothing(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and not value)


def check_call(name: str, entry: VariantEntry, arguments: dict[str, Any]) -> None:
    """Check a call's non-tensor arguments against the contract captured at build.

    Raises:
        InputMismatchError: a Python value other than the one compiled in, or an argument the contract lacks
            (IP-Adapter's ``added_cond_kwargs.image_embeds``, a LoRA scale in ``joint_attention_kwargs``).
    """
    inputs = {spec.name for spec in entry.inputs}
    leaves = dict(call_leaves({k: v for k, v in arguments.items() if k != "return_dict"}))
    for path, value in leaves.items():
        if path in inputs or path in entry.ignored:
            continue
        if path in entry.constants:
            recorded = entry.constants[path]
            if not _same_value(value, recorded):
                raise InputMismatchError(
                    f"{name}: argument {path!r} is {_short(value)}, but this artifact was compiled for "
                    f"{recorded!r} (what the pipeline passed when it was built); call with that value, or rebuild "
                    "with a recipe whose call passes this one"
                )
        elif not _nothing(value) and not any(p.startswith(path + ".") for p in [*inputs, *entry.constants]):
            raise InputMismatchError(
                f"{name}: argument {path!r} is not part of the compiled call (the build captured "
                f"{', '.join(sorted([*inputs, *entry.constants]))}); call without it, or run this module eager"
            )
    for path, recorded in entry.constants.items():
        if path not in leaves and not _nothing(recorded):
            raise InputMismatchError(
                f"{name}: argument {path!r} is missing; this artifact was compiled for {recorded!r}"
            )


def _same_value(value: Any, recorded: Any) -> bool:
    if _nothing(value) and _nothing(recorded):
        return True
    try:
        value = plain(value)
    except ValueError:  # a tensor, a generator, any object: not the recorded value
        return False
    if isinstance(value, bool) or isinstance(recorded, bool):
        return value is recorded  # True == 1 in Python, but not as an argument
    return value == recorded


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bound_arguments(signature: inspect.Signature, owner: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A method call's arguments by name, defaults applied, without self; what a ``**kwargs`` parameter took is
    merged in by keyword (transformers' text encoders take ``output_hidden_states`` that way), as the call
    passed it. How the build records a call and how a stand-in reads one, in one place."""
    bound = signature.bind(owner, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and arguments.pop(name, ()):
            raise InputMismatchError(f"{type(owner).__name__}: extra positional arguments cannot be compiled")
    return arguments


def bind_call(
    where: str, signature: inspect.Signature, owner: Any, names: list[str], args: tuple, kwargs: dict
) -> dict[str, Any]:
    """Bind a call to the eager signature; refuse arguments that change the result but were not compiled."""
    arguments = bound_arguments(signature, owner, args, kwargs)
    compiled = {name.split(".")[0] for name in names}
    for name, value in arguments.items():
        default = signature.parameters[name].default if name in signature.parameters else None
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
    # Exactly so: torch calls a tensor contiguous whatever the strides of its size-1 dimensions (a timestep
    # broadcast to batch 1 has stride 0), while the compiled code's own input check compares every stride.
    if value.stride() != _dense_strides(value.shape):
        value = value.clone(memory_format=torch.contiguous_format)
    return value


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def check_inputs(name: str, entry: VariantEntry, device: torch.device, values: list[Any]) -> list[torch.Tensor]:
    """Check every input of a call against one compiled variant; returns the inputs as its package needs them.

    Raises:
        InputMismatchError: naming the input, what it is, what was compiled, and the call that fits.
    """
    sizes: dict[str, int] = {}
    specs = entry.inputs
    out: list[Any] = [None] * len(specs)
    # Images the user passed first: a control image of another size also makes the latents another size, and
    # the user should hear of what they passed. Coerced inputs (timesteps) take their shape from the others, last.
    order = sorted(range(len(specs)), key=lambda i: (specs[i].coerce, (name, specs[i].name) not in _IMAGE_INPUTS))
    for i in order:
        out[i] = _check(name, entry, device, specs[i], values[i], sizes)
    return out


def _check(
    name: str, entry: VariantEntry, device: torch.device, spec: TensorSpec, value: Any, sizes: dict[str, int]
) -> torch.Tensor:
    where = f"{name}: input {spec.name!r}"
    dtype = torch_dtype(spec.dtype)
    if spec.coerce and value is not None:
        # The eager module broadcasts and casts these itself (a scalar int64 timestep, say), so do the same.
        if not torch.is_tensor(value):
            value = torch.tensor(value)
        if not spec.shape and value.numel() > 1 and bool((value == value.flatten()[0]).all()):
            value = value.flatten()[0]  # one timestep per sample, all the same: the one timestep compiled
        if value.numel() == 1:
            value = value.reshape(()).expand([_size(entry, d, sizes) for d in spec.shape])
        value = value.to(device=device, dtype=dtype)
    return check_tensor(where, spec, value, device, lambda t: _shape_problem(name, entry, where, spec, t, sizes))


def _shape_problem(
    name: str, entry: VariantEntry, where: str, spec: TensorSpec, value: torch.Tensor, sizes: dict[str, int]
) -> str | None:
    if _shape_fits(entry, spec, value, sizes):
        return None
    expected = tuple(_render(entry, d) for d in spec.shape)
    shown = "(" + ", ".join(expected) + ("," if len(expected) == 1 else "") + ")"
    return (
        f"{where} has shape {tuple(value.shape)}, but this artifact was compiled for {shown} "
        f"({describe(entry)}); {_shape_hint(name, entry, spec, value)}"
    )


def _size(entry: VariantEntry, size: int | str, sizes: dict[str, int]) -> int:
    """A dimension's size from the indices seen so far (0 if its index is not known yet)."""
    if isinstance(size, int):
        return size
    d = entry.dims[size]
    base = d.base or size
    return d.value(sizes[base]) if base in sizes else 0


def _shape_fits(entry: VariantEntry, spec: TensorSpec, value: torch.Tensor, sizes: dict[str, int]) -> bool:
    """Whether ``value`` fits ``spec``; ``sizes`` holds each index (DimSpec.base) seen so far, and grows."""
    if value.dim() != len(spec.shape):
        return False
    for want, have in zip(spec.shape, value.shape, strict=True):
        if isinstance(want, int):
            if want != have:
                return False
            continue
        d = entry.dims[want]
        base = d.base or want
        if not d.admits(have):
            return False
        if base in sizes and sizes[base] != d.index(have):  # one index, one size: every input's batch agrees
            return False
        sizes[base] = d.index(have)
    return True


def _render(entry: VariantEntry, size: int | str) -> str:
    if isinstance(size, int):
        return str(size)
    d = entry.dims[size]
    if d.multiple == 1:
        return f"{d.min}..{d.max}"
    if d.offset % d.multiple == 0:
        return f"{d.min}..{d.max} (multiple of {d.multiple})"
    return f"{d.min}..{d.max} (in steps of {d.multiple})"


# Inputs that are images the user passes (at the pixel size the recipe names), and what the user calls them.
_IMAGE_INPUTS = {("vae_encoder", "x"): "an input image", ("controlnet", "controlnet_cond"): "a control image"}


def _shape_hint(name: str, entry: VariantEntry, spec: TensorSpec, value: torch.Tensor) -> str:
    s = entry.shapes
    fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
    only_batch_differs = (
        fixed is not None and value.dim() == len(spec.shape) and list(value.shape[1:]) == spec.shape[1:]
    )
    if only_batch_differs and entry.cfg and value.shape[0] * 2 == fixed:
        return (
            f"this artifact was built with cfg = true for {fmt_range(s['batch'])} image(s) per call: call with "
            f"guidance_scale > 1 (guidance_scale <= 1 turns classifier-free guidance off) and "
            f"{fmt_range(s['batch'])} image(s) in all, or rebuild with [components.{name}] cfg = false"
        )
    if only_batch_differs and entry.cfg is False and value.shape[0] == fixed * 2:
        return (
            f"this artifact was built with cfg = false for {fmt_range(s['batch'])} image(s) per call: call with "
            f"guidance_scale <= 1 (a larger one turns classifier-free guidance on) and {fmt_range(s['batch'])} "
            f"image(s) in all, or rebuild with [components.{name}] cfg = true"
        )
    image = _IMAGE_INPUTS.get((name, spec.name))
    if image is not None and s.get("image_height"):
        return f"pass {image} of {_image_size(s)} pixels, or rebuild with [components.{name}] shapes set for this size"
    if image is not None:
        size = f"{fmt_range(s['height'])}x{fmt_range(s['width'])}"
        return (
            f"pass {image} of {size} pixels (or height and width of {size} where the pipeline takes them and resizes "
            f"it), or rebuild with [components.{name}] shapes set for this size"
        )
    call = f"height={fmt_range(s['height'])}, width={fmt_range(s['width'])}"
    if s.get("text_tokens"):
        call += f", max_sequence_length={fmt_range(s['text_tokens'])}"
    if s.get("image_height"):
        call += f", an image of {_image_size(s)} pixels"
    return (
        f"call the pipeline with {call} and {fmt_range(s['batch'])} image(s) in all (prompts x "
        f"num_images_per_prompt), or rebuild with [components.{name}] shapes set for this call"
    )
